"""Robust aggregation around any strategy: outlier refusal, update clipping, median and trimmed mean.

Configured by ``[robust]`` (off by default); composed by ``make_strategy`` like every wrapper.

- ``outlier_factor`` (screening, before anything is aggregated): a reply whose update norm
  ``||reply - what the client was sent||`` exceeds ``outlier_factor`` times the median norm of its
  group (3 or more replies) is refused; the round's ``rejected`` list in ``metrics.jsonl`` names it
  with both norms, and the model never sees it.
- ``clip_norm``: every update is scaled down to at most this L2 norm (as in DP-FedAvg's clipping,
  McMahan et al. 2018), so one client moves the model by a bounded amount.
- ``aggregation = median | trimmed_mean``: the coordinate-wise median (Yin et al. 2018,
  https://arxiv.org/abs/1803.01498) or trimmed mean of the group's replies, extras included (SCAFFOLD's
  control-variate deltas). The wrapped algorithm still aggregates (its own bookkeeping, tiers, weights):
  it receives every reply of a group replaced by the group's robust estimate, so its weighted mean is
  that estimate (to rounding). A group is what the algorithm averages together: all replies, or one
  edge's in a hierarchy (``Strategy.aggregation_group``). Keys only some replies hold (U-Net-partial
  schemes) are combined over the replies that hold them.

Screening and clipping measure the model update only: an algorithm's extras (SCAFFOLD's control-variate
deltas) are not screened or clipped; the median and trimmed mean do combine them robustly.

Each round records ``robust``: the rule, the clients clipped (with their norms) and each group's size.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import replace
from typing import Any

from feddiff.algorithms.aggregate import clip_update, coordinate_median, trimmed_mean, update_norm
from feddiff.algorithms.base import Failure, Reply, Strategy, StrategyWrapper, Task
from feddiff.algorithms.registry import Wrapper, register_wrapper
from feddiff.types import StateDict

MIN_GROUP_FOR_OUTLIERS = 3


class RobustStrategy(StrategyWrapper):
    """``[robust]`` around ``inner``: screening, clipping and a robust combination of each group's replies."""

    def __init__(self, inner: Strategy, cfg: Any):
        super().__init__(inner)
        self.robust_cfg = cfg
        self.tasks: dict[int, Task] = {}
        self.robust_summary: dict[str, Any] = {}

    def configure(self, rnd: int) -> list[Task]:
        tasks = self.inner.configure(rnd)
        self.tasks = {t.client: t for t in tasks}
        self.robust_summary = {"aggregation": self.robust_cfg.aggregation}
        return tasks

    def _reference(self, reply: Reply) -> StateDict:
        task = self.tasks.get(reply.client)
        return task.tensors if task is not None else {}

    def _groups(self, replies: list[Reply]) -> dict[Any, list[Reply]]:
        groups: dict[Any, list[Reply]] = defaultdict(list)
        for r in replies:
            task = self.tasks.get(r.client)
            groups[self.inner.aggregation_group(task) if task is not None else 0].append(r)
        return groups

    def screen(self, rnd: int, replies: list[Reply]) -> tuple[list[Reply], list[Failure]]:
        kept, refused = self.inner.screen(rnd, replies)
        factor = self.robust_cfg.outlier_factor
        if not factor:
            return kept, refused
        out_of_bounds: set[int] = set()
        for group in self._groups(kept).values():
            by_keys: dict[frozenset, list[Reply]] = defaultdict(list)  # norms compare over the same tensors
            for r in group:  # (USPLIT's clients upload different parts)
                by_keys[frozenset(r.tensors)].append(r)
            for rs in by_keys.values():
                self._screen_group(rs, factor, out_of_bounds, refused)
        return [r for r in kept if r.client not in out_of_bounds], refused

    def _screen_group(self, rs: list[Reply], factor: float, out_of_bounds: set[int], refused: list[Failure]) -> None:
        if len(rs) < MIN_GROUP_FOR_OUTLIERS:
            return
        norms = {r.client: update_norm(r.tensors, self._reference(r)) for r in rs}
        median = statistics.median(norms.values())
        for r in rs:
            if median > 0 and norms[r.client] > factor * median:
                out_of_bounds.add(r.client)
                refused.append(Failure(r.client, f"rejected: update norm {norms[r.client]:.4g} is "
                                                 f"{norms[r.client] / median:.1f}x the median of its group "
                                                 f"({median:.4g}; robust.outlier_factor = {factor:g})"))

    def aggregate(self, rnd: int, replies: list[Reply], failures: list[Failure] = ()) -> dict[str, float]:
        cfg = self.robust_cfg
        if cfg.clip_norm:
            clipped = {}
            out = []
            for r in replies:
                tensors, norm = clip_update(r.tensors, self._reference(r), cfg.clip_norm)
                if tensors is not r.tensors:
                    clipped[str(r.client)] = round(norm, 6)
                out.append(replace(r, tensors=tensors))
            replies = out
            self.robust_summary["clipped"] = clipped
        if cfg.aggregation != "mean":
            groups = self._groups(replies)
            self.robust_summary["groups"] = {str(g): len(rs) for g, rs in groups.items()}
            estimate = {id(r): r for r in replies}
            for rs in groups.values():
                tensors = self._combine([r.tensors for r in rs])
                extras = self._combine([r.extras for r in rs])
                for r in rs:
                    estimate[id(r)] = replace(r, tensors={k: tensors[k] for k in r.tensors},
                                              extras={k: extras[k] for k in r.extras})
            replies = [estimate[id(r)] for r in replies]
        return self.inner.aggregate(rnd, replies, failures)

    def _combine(self, states: list[StateDict]) -> StateDict:
        """Per key, the robust estimate over the states holding it (non-floating tensors: the first's)."""
        holders: dict[str, list] = defaultdict(list)
        for s in states:
            for k, v in s.items():
                holders[k].append(v)
        out = {}
        for k, vs in holders.items():
            if not vs[0].is_floating_point():
                out[k] = vs[0]
            elif self.robust_cfg.aggregation == "median":
                out[k] = coordinate_median(vs)
            else:
                out[k] = trimmed_mean(vs, self.robust_cfg.trim)
        return out

    def round_metrics(self, rnd: int) -> dict[str, Any]:
        return {**self.inner.round_metrics(rnd), "robust": dict(self.robust_summary)}


def wrap(strategy: Strategy, cfg: Any) -> Strategy:
    r = cfg.robust
    if r.aggregation == "mean" and not r.clip_norm and not r.outlier_factor:
        return strategy
    return RobustStrategy(strategy, r)


register_wrapper(Wrapper("robust", wrap, order=10))
