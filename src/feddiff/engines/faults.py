"""Fault injection around any engine: drills for a federation's resilience (tests, bench/fault_soak.py).

:class:`FaultyEngine` wraps an engine and makes chosen clients fail in chosen rounds, in the ways
real federations fail. ``plan(round, client, attempt) -> kind | None`` decides (``attempt`` counts the
messages a client got in that round, from 0: a retry is attempt 1). Kinds:

==============  ===================================================================================
``raise``       the client raises before training (it never sees the message; its record is kept)
``disconnect``  no reply at all (the node vanished before training)
``nan``         a valid frame whose first floating tensor holds NaN (the client trained; its record moved on)
``wrong_shape`` a valid frame with one tensor of another shape
``wrong_name``  a valid frame with one tensor renamed
``truncate``    the reply cut in half (a broken connection): the frame's checksum fails
``oversize``    the reply padded far past any honest size: refused before it is parsed
``huge_norm``   a valid, finite reply whose update is 1000x the honest one (a poisoned update):
                only ``[robust]`` screening or robust aggregation stops it
==============  ===================================================================================

Altered replies are re-encoded with the identity codec, so they are well formed on the wire; use
uplinks in ``weights`` mode for ``huge_norm`` (a ``delta`` uplink decodes it as a delta from the
reference, which is what a poisoned client would send anyway).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from feddiff.compress import wire
from feddiff.engines.loop import Engine, Incoming, Outgoing, RoundEvents
from feddiff.seeding import numpy_rng

KINDS = ("raise", "disconnect", "nan", "wrong_shape", "wrong_name", "truncate", "oversize", "huge_norm")
BEFORE = ("raise", "disconnect")  # the client never runs

Plan = Callable[[int, int, int], "str | None"]


def random_plan(rate: float, kinds: tuple[str, ...] = KINDS, seed: int = 0, first_attempt_only: bool = False) -> Plan:
    """Each (round, client, attempt) fails with probability ``rate``, in a kind drawn from ``kinds``; seeded."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"fault kinds must be some of {list(KINDS)}, got {list(kinds)}")

    def plan(rnd: int, client: int, attempt: int) -> str | None:
        if first_attempt_only and attempt:
            return None
        rng = numpy_rng(seed, "fault", rnd, client, attempt)
        return str(kinds[int(rng.integers(len(kinds)))]) if rng.random() < rate else None

    return plan


def _alter(blob: bytes, kind: str, reference: dict[str, torch.Tensor] | None) -> bytes:
    if kind == "truncate":
        return blob[: len(blob) // 2]
    msg = wire.decode(blob)
    if kind == "oversize":  # past the server's limit (twice the tensors at fp32 plus 1 MiB) whatever the codec
        fp32 = 4 * sum(t.numel() for t in msg.tensors.values())
        return blob + bytes(3 * fp32 + (2 << 20))
    tensors = dict(msg.tensors)
    name = next((k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1), next(iter(tensors)))
    v = tensors[name]
    if kind == "nan":
        v = v.clone()
        v.view(-1)[0] = float("nan")
        tensors[name] = v
    elif kind == "wrong_shape":
        tensors[name] = torch.zeros(v.numel() + 1, dtype=v.dtype)
    elif kind == "wrong_name":
        tensors[name + ".renamed"] = tensors.pop(name)
    elif kind == "huge_norm":
        for k, t in tensors.items():
            if t.is_floating_point():
                ref = reference.get(k) if reference else None
                base = ref if ref is not None and ref.shape == t.shape else torch.zeros_like(t)
                tensors[k] = base + 1000.0 * (t - base)
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return wire.encode(wire.Message(tensors, msg.meta))


class FaultyEngine:
    """An engine whose clients fail as ``plan`` says; every injected fault is listed in ``injected``."""

    def __init__(self, inner: Engine, plan: Plan):
        self.inner, self.plan = inner, plan
        self.injected: list[tuple[int, int, int, str]] = []  # (round, client, attempt, kind)
        self.attempts: dict[tuple[int, int], int] = defaultdict(int)  # messages per (round, client) so far

    def send_and_receive(self, rnd: int, messages: list[Outgoing], events: RoundEvents) -> list[Incoming]:
        if rnd < 0:  # setup queries: not a round
            return self.inner.send_and_receive(rnd, messages, events)
        kinds = {}
        for m in messages:
            attempt = self.attempts[(rnd, m.client)]
            self.attempts[(rnd, m.client)] += 1
            kind = self.plan(rnd, m.client, attempt)
            if kind is not None:
                if kind not in KINDS:
                    raise ValueError(f"fault plan gave {kind!r}; kinds are {list(KINDS)}")
                kinds[m.client] = kind
                self.injected.append((rnd, m.client, attempt, kind))
        failed = [Incoming(m.client, error=f"injected: client {m.client} "
                           + ("raised RuntimeError" if kinds[m.client] == "raise" else "disconnected"))
                  for m in messages if kinds.get(m.client) in BEFORE]
        for inc in failed:
            events.done(inc)
        passed = [m for m in messages if kinds.get(m.client) not in BEFORE]
        # replies to alter are reported once altered, not as the inner engine produced them
        inner_events = RoundEvents(events.start, events.step,
                                   lambda inc: None if inc.client in kinds else events.done(inc))
        out = self.inner.send_and_receive(rnd, passed, inner_events) if passed else []
        sent = {m.client: m.blob for m in passed}
        altered = []
        for inc in out:
            kind = kinds.get(inc.client)
            if kind is not None and inc.blob is not None:
                # huge_norm scales the update from what the client was sent (an identity weights downlink)
                reference = wire.decode(sent[inc.client]).tensors if kind == "huge_norm" else None
                inc = Incoming(inc.client, blob=_alter(inc.blob, kind, reference))
                events.done(inc)
            altered.append(inc)
        return failed + altered

    def __getattr__(self, name: str) -> Any:  # personal_models, state_dict, rollback, ... of the inner engine
        return getattr(self.inner, name)


__all__ = ["BEFORE", "KINDS", "FaultyEngine", "random_plan"]
