"""U-Net partial sharing: USPLIT, UDEC and ULATDEC of de Goede, Cox and Decouchant,
"Training Diffusion Models with Federated Learning" (2024, https://arxiv.org/abs/2406.12575),
as read from the authors' code (federator.py, client.py, aggregation.py; see
shared/reference/papers.md section 3).

The U-Net's parameters fall into three groups (``model/parts.py``): encoder (conv_in, time
embedding, down blocks), latent (mid block) and decoder (up blocks, output head).

- USPLIT: each round the sampled clients are paired at random. In a pair one member uploads the
  decoder, the other the encoder, and the latent part goes to one of them at random; an odd client
  out uploads the latent part plus one side at random; a lone client uploads everything. Every
  client downloads and trains the whole model. Each group is averaged over the clients that
  uploaded it, weighted by sample count.
- UDEC: clients keep persistent personal models. The first time a client takes part it receives
  the full model; afterwards only the global decoder, loaded over its personal model. It trains
  the whole model and uploads only the decoder, which the server averages (sample-weighted).
- ULATDEC: as UDEC with latent + decoder shared.

Personal models are evaluated one by one: each client's private parts with the latest global
shared parts (the model it would start the next round from).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from feddiff.algorithms.aggregate import AggregationError, weighted_mean
from feddiff.algorithms.base import Failure, Reply, Strategy, StrategyContext, Task
from feddiff.algorithms.registry import Algorithm, register
from feddiff.config import F, AlgorithmConfig
from feddiff.model.parts import group_of, select
from feddiff.seeding import numpy_rng
from feddiff.types import StateDict


class USplitConfig(AlgorithmConfig):
    """USPLIT (de Goede et al. 2024): paired clients upload complementary U-Net parts."""

    name: Literal["usplit"] = F("usplit", "algorithm: usplit")


class UDecConfig(AlgorithmConfig):
    """UDEC (de Goede et al. 2024): only the decoder is shared; encoders and latent stay private."""

    name: Literal["udec"] = F("udec", "algorithm: udec")


class ULatDecConfig(AlgorithmConfig):
    """ULATDEC (de Goede et al. 2024): latent + decoder shared; encoders stay private."""

    name: Literal["ulatdec"] = F("ulatdec", "algorithm: ulatdec")


def _update_groups(global_model: StateDict, replies: list[Reply]) -> dict[str, int]:
    """Average each tensor over the replies that carry it (weights: sample counts), in place.

    Every reply is checked before anything is written, so a bad reply leaves the model as it was.
    Returns how many clients contributed to each group.
    """
    unknown = {k for r in replies for k in r.tensors} - set(global_model)
    if unknown:
        raise AggregationError(f"replies carry tensors the model does not have: {sorted(unknown)[:5]}")
    contributors: dict[str, int] = {}
    means: StateDict = {}
    for key in global_model:
        holders = [r for r in replies if key in r.tensors]
        if not holders:
            continue
        means[key] = weighted_mean([{key: r.tensors[key]} for r in holders], [r.num_samples for r in holders])[key]
        contributors[group_of(key)] = len(holders)
    global_model.update(means)
    return contributors


class USplit(Strategy):
    """USPLIT: full download, complementary partial uploads, per-group averaging."""

    def configure(self, rnd: int) -> list[Task]:
        rng = numpy_rng(self.seed, "usplit-pairs", rnd)
        clients = [int(c) for c in rng.permutation(self.sample_clients(rnd))]
        assigned: dict[int, list[str]] = {}
        if len(clients) == 1:
            assigned[clients[0]] = ["encoder", "latent", "decoder"]
        for a, b in zip(clients[0::2], clients[1::2]):
            latent_to_a = int(rng.integers(2)) == 0
            assigned[a] = ["decoder"] + (["latent"] if latent_to_a else [])
            assigned[b] = ["encoder"] + ([] if latent_to_a else ["latent"])
        if len(clients) > 1 and len(clients) % 2:
            odd = clients[-1]
            assigned[odd] = ["latent", "decoder" if int(rng.integers(2)) == 0 else "encoder"]
        return [
            Task(c, self.global_model, {"round": rnd, "upload": sorted(assigned[c])})
            for c in sorted(assigned)
        ]

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        counts = _update_groups(self.global_model, replies)
        return {f"{g}_clients": float(n) for g, n in sorted(counts.items())}


class UDec(Strategy):
    """UDEC: persistent personal models, only the decoder is shared."""

    personalized: ClassVar[bool] = True
    shared: ClassVar[tuple[str, ...]] = ("decoder",)

    def __init__(self, cfg: Any, context: StrategyContext):
        super().__init__(cfg, context)
        self.initialized: set[int] = set()  # clients whose full-model round came back

    def configure(self, rnd: int) -> list[Task]:
        tasks = []
        for c in self.sample_clients(rnd):
            # the full model once, at a client's first participation; then the shared part only
            # (marked in aggregate, once its reply has arrived: a failed first round sends the full model again)
            tensors = self.global_model if c not in self.initialized else select(self.global_model, self.shared)
            tasks.append(Task(c, tensors, {"round": rnd, "upload": list(self.shared), "personal": True}))
        return tasks

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        _update_groups(self.global_model, replies)
        self.initialized.update(r.client for r in replies)
        return {}

    def personal_model(self, personal: StateDict) -> StateDict:
        return {**personal, **select(self.global_model, self.shared)}

    def state_dict(self) -> tuple[StateDict, dict[str, Any]]:
        tensors, meta = super().state_dict()
        return tensors, {**meta, "initialized": sorted(self.initialized)}

    def load_state_dict(self, tensors: StateDict, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.initialized = set(meta["initialized"])


class ULatDec(UDec):
    """ULATDEC: as UDEC with the latent (mid) block shared too."""

    shared: ClassVar[tuple[str, ...]] = ("latent", "decoder")


register(Algorithm("usplit", USplitConfig, USplit))
register(Algorithm("udec", UDecConfig, UDec))
register(Algorithm("ulatdec", ULatDecConfig, ULatDec))
