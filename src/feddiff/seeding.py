"""Owned randomness: every stochastic step draws from a generator derived from the root seed.

``derive_seed(seed, "batches", round, client)`` is stable across processes and machines (it does
not use Python's salted ``hash``), so a client's batches and noise depend only on (seed, round,
client): the same in the simulator, after a resume, and on a Flower node.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the root seed and a path of names/numbers."""
    text = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(device: torch.device | str, seed: int, *parts: object) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *parts))
    return g


def numpy_rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))


@contextlib.contextmanager
def global_rng(device: torch.device | str, seed: int, *parts: object) -> Iterator[None]:
    """Seed torch's global RNG from (seed, parts) inside the block and restore it afterwards.

    For what draws from the global generator and takes no ``generator=`` (dropout), so a round of
    a client is the same whether it runs in one process, after a resume, or beside other runs.

    Parameters
    ----------
    device : torch.device or str
        Where the block's random draws happen. The CPU generator is always seeded; for a CUDA
        device, that device's default generator is seeded too. No other generator is touched
        (``torch.manual_seed`` would reseed every CUDA device, or queue that for when CUDA starts),
        so nothing else needs restoring.
    seed : int
        The root seed.
    *parts : object
        The path of names and numbers ``derive_seed`` turns into this block's seed.

    Yields
    ------
    None
        On exit (also by an exception) the CPU generator, and the CUDA device's one, hold the
        state they had on entry.
    """
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    value = derive_seed(seed, *parts)
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(value)
        for index in cuda:  # fork_rng has read its state, so CUDA is initialised
            torch.cuda.default_generators[index].manual_seed(value)
        yield
