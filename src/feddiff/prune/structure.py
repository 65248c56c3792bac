"""Structured channel pruning of a diffusers ``UNet2DModel`` with Torch-Pruning (DepGraph), and its replay.

FedPhD (Long et al. 2025, https://arxiv.org/abs/2507.06449, ``structure_prune.py``) prunes the U-Net once,
with group magnitude (L2) importance, ``conv_out`` ignored, one uniform ratio per layer. The same recipe is
Diff-Pruning's (Fang et al. 2023) with magnitude instead of Taylor importance.

- :func:`prune_model` prunes a model in place and returns the *structural step* that records it: the ratio,
  the importance and Torch-Pruning's pruning history (``[module, is_out_channel, indices]`` per pruned
  layer; about 16 KB of JSON for the 35.7M CIFAR-10 U-Net).
- :func:`replay` applies such a step to a fresh model of the same architecture
  (``DependencyGraph.load_pruning_history``): every client rebuilds exactly the server's architecture from its
  own copy, and ``build_model(spec)`` rebuilds it on resume, for evaluation and for ``feddiff sample``.
- :func:`index_maps` and :func:`restructure` prune *any* tensors named like the model's parameters (optimizer
  moments, control variates, personal models, error-feedback residuals, edge models) with the same indices.

After Torch-Pruning, two diffusers attributes no longer match the weights and are fixed: ``Attention``
(``inner_dim``, ``scale``; heads are kept, each head's dimension is pruned alike) and
``Downsample2D/Upsample2D.channels`` (their forward asserts it).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from math import prod
from collections import OrderedDict
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D

from feddiff.model.spec import STRUCTURAL_STEPS, ModelSpec, SpecError, build_model
from feddiff.types import StateDict

IMPORTANCES = ("magnitude", "taylor")
KIND = "prune"


def example_inputs(model: UNet2DModel) -> dict[str, torch.Tensor]:
    """The trace inputs of a U-Net (one image at its configured size, timestep 1), on its device."""
    c = model.config
    p = next(model.parameters())
    return {"sample": torch.zeros(1, c.in_channels, c.sample_size, c.sample_size, device=p.device, dtype=p.dtype),
            "timestep": torch.ones(1, dtype=torch.long, device=p.device)}


def _attention_heads(model: UNet2DModel) -> dict[torch.nn.Module, int]:
    """q/k/v projections -> heads, so Torch-Pruning removes the same dimensions from every head."""
    return {proj: m.heads for m in model.modules() if isinstance(m, Attention) for proj in (m.to_q, m.to_k, m.to_v)}


def fix_layers(model: UNet2DModel) -> None:
    """Make the attributes diffusers reads in ``forward`` agree with the pruned weights."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.inner_dim, m.inner_kv_dim = m.to_q.out_features, m.to_k.out_features
            m.query_dim, m.out_dim = m.to_q.in_features, m.to_out[0].out_features
            head_dim = m.inner_dim // m.heads
            if head_dim * m.heads != m.inner_dim:  # Torch-Pruning was told the heads: cannot happen
                raise SpecError(f"attention {m.inner_dim} dims do not split into {m.heads} heads after pruning")
            if m.scale_qk:  # the classic processor reads it; SDPA uses 1/sqrt(head_dim) itself
                m.scale = head_dim ** -0.5
        elif isinstance(m, Downsample2D) and m.conv is not None and hasattr(m.conv, "in_channels"):
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
        elif isinstance(m, Upsample2D) and m.conv is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels


def prune_model(model: UNet2DModel, ratio: float, importance: str = "magnitude",
                gradients: StateDict | None = None) -> dict[str, Any]:
    """Prune ``model`` in place; returns the structural step (JSON) that :func:`replay` applies elsewhere.

    Parameters
    ----------
    model
        The U-Net (its weights rank the channels).
    ratio
        Torch-Pruning's ``pruning_ratio`` (0 < ratio < 1). Channels of GroupNorm-coupled layers are pruned
        alike in every group, so the kept fraction of a layer with group size g is ``int(g * (1 - ratio)) / g``:
        ratios step (docs/algorithms.md lists the sizes of every ratio for each preset).
    importance
        ``magnitude``: group L2 norm of the coupled weights (FedPhD). ``taylor``: group first-order Taylor
        saliency ``|w * g|`` with ``gradients`` as g (a federated run passes the last aggregate update).
    gradients
        Parameter name -> gradient, for ``taylor``.
    """
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    if importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    elif importance == "taylor":
        if gradients is None:
            raise ValueError("taylor importance needs gradients (a model that has been trained)")
        imp = _taylor_or_magnitude(tp)
        for name, p in model.named_parameters():
            p.grad = gradients[name].to(p.device, p.dtype).clone()
    else:
        raise ValueError(f"unknown pruning importance {importance!r}; choose from {list(IMPORTANCES)}")
    widths = _widths(model)
    was_training = model.training
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        pruner = tp.pruner.BasePruner(model, example_inputs(model), importance=imp, pruning_ratio=ratio,
                                      ignored_layers=[model.conv_out], num_heads=_attention_heads(model),
                                      prune_head_dims=True, prune_num_heads=False)
        pruner.step()
    fix_layers(model)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    history = [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in pruner.pruning_history()]
    after = _widths(model)
    if not history:
        raise ValueError(f"pruning ratio {ratio} removes no channel of this model (GroupNorm groups of "
                         f"{[w // model.config.norm_num_groups for w in widths]} channels per level keep "
                         "int(size * (1 - ratio)) each, and a group would be emptied)")
    kept = [i for i, (a, b) in enumerate(zip(widths, after)) if a == b]
    if kept:
        warnings.warn(f"pruning ratio {ratio} leaves level(s) {kept} at full width ({widths} -> {after}): a GroupNorm "
                      "group would keep int(size * (1 - ratio)) = 0 channels there, which Torch-Pruning refuses",
                      stacklevel=2)
    return {"kind": KIND, "ratio": float(ratio), "importance": importance, "history": history}


def _widths(model: UNet2DModel) -> list[int]:
    """Channels of each resolution level (the first resnet's output of each down block)."""
    return [int(b.resnets[0].conv1.out_channels) for b in model.down_blocks]


def _taylor_or_magnitude(tp):
    """Group Taylor importance |w * g|, or the group's magnitude where g is zero all over it.

    Groups the update never reached (a hierarchy's or a personalised model's parts the server did not
    average this round) would all score 0 (NaN after Torch-Pruning's mean normaliser); their channels are
    ranked by magnitude instead. Local pruning ranks within each group, so no normaliser is needed.
    """
    taylor = tp.importance.GroupTaylorImportance(normalizer=None)
    magnitude = tp.importance.GroupMagnitudeImportance(p=2)

    class TaylorOrMagnitude(tp.importance.Importance):
        def __call__(self, group):
            scores = taylor(group)
            if scores is None or not bool(torch.isfinite(scores).all()) or not bool(scores.abs().sum() > 0):
                return magnitude(group)
            return scores

    return TaylorOrMagnitude()


def replay(model: UNet2DModel, step: dict[str, Any]) -> None:
    """Apply a structural step of :func:`prune_model` to a model of the architecture it was recorded on."""
    import torch_pruning as tp

    history = step.get("history")
    if not isinstance(history, list):
        raise SpecError("a 'prune' step needs its 'history' (a list of [module, is_out_channel, indices])")
    names = dict(model.named_modules())
    unknown = sorted({h[0] for h in history if h[0] not in names})
    if unknown:
        raise SpecError(f"the pruning history names modules this model lacks: {unknown[:3]}")
    was_training = model.training
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs(model))
        graph.load_pruning_history([[n, bool(o), list(i)] for n, o, i in history])
    fix_layers(model)
    model.train(was_training)


STRUCTURAL_STEPS[KIND] = replay


# -- pruning any tensors named like the model's parameters ---------------------------------------
IndexMaps = dict[str, tuple[tuple[int, ...], dict[int, torch.Tensor]]]  # name -> (old shape, dim -> kept)
_MAPS: OrderedDict[tuple[str, str], IndexMaps] = OrderedDict()


def index_maps(before: ModelSpec, after: ModelSpec) -> IndexMaps:
    """Which indices of every parameter of ``before`` survive in ``after`` (whose history extends it).

    Found by replaying the new steps on a model whose every parameter holds its own flat positions, so the
    maps are exactly what the replay keeps. Cached per pair of specs.
    """
    key = (before.id, after.id)
    if key in _MAPS:
        _MAPS.move_to_end(key)
        return _MAPS[key]
    n = len(before.history)
    if after.unet != before.unet or after.history[:n] != before.history:
        raise SpecError("the new model spec does not extend the old one (another base architecture)")
    model = build_model(before, 0).double()  # float64 holds every position exactly (up to 2**53)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).view_as(p))
    for step in after.history[n:]:
        STRUCTURAL_STEPS[step["kind"]](model, step)
    maps: IndexMaps = {}
    for name, p in model.named_parameters():
        old = shapes[name]
        if tuple(p.shape) == old:
            continue
        flat = p.detach().long()
        dims: dict[int, torch.Tensor] = {}
        for d, (was, now) in enumerate(zip(old, p.shape)):
            if was != now:
                line = flat[tuple(slice(None) if j == d else 0 for j in range(flat.ndim))]
                dims[d] = torch.unravel_index(line, old)[d].clone()
        maps[name] = (old, dims)
        got = restructure({name: torch.arange(prod(old)).view(old)}, {name: maps[name]})[name]
        if not torch.equal(got, flat):  # the step is not a selection of indices per dimension
            raise SpecError(f"structural step on {name} is not an index selection per dimension; cannot map tensors")
    _MAPS[key] = maps
    while len(_MAPS) > 8:
        _MAPS.popitem(last=False)
    return maps


def restructure(tensors: StateDict, maps: IndexMaps) -> StateDict:
    """``tensors`` with every entry that holds a pruned parameter's values pruned alike.

    An entry is a parameter's when one ``/``-separated part of its key is the parameter's name and its shape
    is the parameter's old shape (``global/<p>``, ``edge/1/<p>``, ``scaffold/c/<p>``, ``ef/<p>``, ``<p>/exp_avg``);
    anything else (scalars, label counts, tensors already of the new shape) is kept as it is.
    """
    out: StateDict = {}
    for key, v in tensors.items():
        hit = next((maps[part] for part in key.split("/") if part in maps), None)
        if hit is not None and tuple(v.shape) == hit[0]:
            for d, idx in hit[1].items():
                v = v.index_select(d, idx.to(v.device))
        out[key] = v
    return out


def to_spec(tensors: StateDict, before: ModelSpec, after: ModelSpec) -> StateDict:
    """Bring tensors of a model of spec ``before`` to spec ``after`` (identity when they are equal)."""
    if before.id == after.id:
        return tensors
    return restructure(tensors, index_maps(before, after))


__all__ = ["IMPORTANCES", "KIND", "example_inputs", "fix_layers", "index_maps", "prune_model", "replay",
           "restructure", "to_spec"]
