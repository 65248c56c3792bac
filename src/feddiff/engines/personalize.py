"""Personalised fine-tuning: each client adapts the final model to its own data (FedDM's model adaptation).

Vora et al. 2024 (FedDM, https://arxiv.org/abs/2407.14730) adapt the global model to each client by
fine-tuning it on the client's data. Here it is a phase after the last round (``[personalize]``, or
``feddiff personalize RUN_DIR`` on a finished run): every client starts from the model it would sample
from (the global model, its EMA when there is one, or its own personal model for UDEC/ULATDEC), trains it
for ``steps`` local steps on its own train images (only the parameter ``groups`` asked for; the rest is
frozen), and the result is evaluated. Nothing leaves a client: no message is sent, and the phase's record
says 0 bytes.

Evaluation uses the per-client protocol of the personal-model schemes: each model's held-out loss and FD
against the reference split (the global distribution) and against the client's own distribution (the
reference split reweighted to the client's label shares, :func:`~feddiff.metrics.fid.reweighted_stats`),
summarized as mean, std, min and max over clients, before and after fine-tuning. The record goes to
``RUN_DIR/personalize.json``, the models to ``RUN_DIR/personalized/client<k>`` (``DDPMPipeline`` folders),
their grids to ``samples/personalized-client<k>.png``; ``feddiff report`` shows global vs personalised.

The phase needs every client's data in one process: the simulator (a Flower run refuses it; each site
would fine-tune its own copy).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from feddiff.client.train import train_local
from feddiff.config import ConfigError, PersonalizeConfig
from feddiff.engines.evaluate import cache_dir, reference_key, reference_subset, summarize
from feddiff.engines.experiment import load_split
from feddiff.metrics.fid import FeatureStats, label_weights, reweighted_stats
from feddiff.metrics.quality import reference_features
from feddiff.model.export import save_pipeline
from feddiff.model.parts import group_of
from feddiff.seeding import global_rng, torch_generator
from feddiff.types import StateDict, clone_state, client_node

PHASE_FILE = "personalize.json"
MODELS_DIR = "personalized"


def client_references(cfg, net, histograms: dict[int, np.ndarray],
                      log: Callable[[str], None]) -> tuple[dict[int, FeatureStats], dict[int, float]]:
    """Each client's own distribution: the reference split's features reweighted to its label shares.

    Returns the statistics and each one's effective number of reference images (Kish:
    ``(sum w)^2 / sum w^2``; a class with few reference rows weighs on few images).
    """
    ref = load_split(cfg, cfg.eval.reference_split)
    if ref.labels is None:
        log("note: the reference split has no labels; FD against each client's own distribution is skipped")
        return {}, {}
    idx = reference_subset(cfg.eval, len(ref.images))
    images, labels = (ref.images, ref.labels) if idx is None else (ref.images[torch.from_numpy(idx)],
                                                                    ref.labels[torch.from_numpy(idx)])
    feats = reference_features(net, images, cache_dir=cache_dir(cfg.eval), key=reference_key(cfg))
    out, ess = {}, {}
    y = labels.numpy()
    for k, hist in histograms.items():
        try:
            out[k] = reweighted_stats(feats, y, hist)
        except ValueError as err:  # a class the client holds is missing from a small reference subset
            log(f"note: client {k}: no own-distribution reference ({err})")
            continue
        w = label_weights(y, hist)
        ess[k] = float(w.sum() ** 2 / (w**2).sum())
    return out, ess


def _frozen(model: torch.nn.Module, groups: list[str]) -> list[torch.nn.Parameter]:
    """Freeze the parameters outside ``groups`` (none when empty); returns those frozen."""
    if not groups:
        return []
    out = [p for n, p in model.named_parameters() if group_of(n) not in groups and p.requires_grad]
    for p in out:
        p.requires_grad_(False)
    return out


def run_phase(sim, rounds_done: int, pcfg: PersonalizeConfig, clients: list[int] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune, evaluate and export each client's model; writes ``personalize.json``; returns the record."""
    exp, server, cfg = sim.exp, sim.server, sim.cfg
    t0 = time.perf_counter()
    sim.prepare_quality()
    evaluator = server.evaluator
    clients = exp.chosen_clients(clients)
    starts = server.eval_models(sim.engine)
    personal = exp.strategy.personalized
    missing = [k for k in clients if personal and client_node(k) not in starts]
    if missing:
        log(f"note: clients {missing} never trained a personal model; they are skipped")
        clients = [k for k in clients if k not in missing]

    histograms = {k: np.bincount(exp.client_data[k].labels.numpy(), minlength=exp.train.num_classes)
                  for k in clients if exp.client_data[k].labels is not None}
    refs, ess = client_references(cfg, evaluator.quality[0].net, histograms, log) if evaluator.quality else ({}, {})
    if evaluator.quality is None:
        log("note: eval.fid_num_samples = 0: no FD is measured (held-out loss only); give e.g. "
            "--set eval.fid_num_samples=500")
    server.ledger.close_round()  # whatever the rounds left unsummarised is theirs, not the phase's
    model, spec_now = server.working_model(), exp.strategy.spec or exp.spec
    samples = sim.run_dir.path / "samples"

    def score(state: StateDict, k: int | None = None) -> dict[str, Any]:
        """Held-out loss, FD and FD against client k's own distribution (k None: against every client's)."""
        model.load_state_dict(state)
        out: dict[str, Any] = {}
        if evaluator.heldout is not None:
            out["heldout_loss"] = evaluator.heldout_loss(model)
        if evaluator.quality is not None:
            own = {client_node(c): refs[c] for c in (clients if k is None else [k]) if c in refs}
            q = evaluator.quality_metrics(model, own)
            out["fd"] = q["fd"]
            out["fd_vs"] = q.get("fd_vs", {})
        return out

    def row(scored: dict[str, Any], k: int) -> dict[str, Any]:
        """Client k's numbers of a score: held-out loss, FD, and its own-distribution FD as ``fd_own``."""
        out = {key: scored[key] for key in ("heldout_loss", "fd") if key in scored}
        if client_node(k) in scored.get("fd_vs", {}):
            out["fd_own"] = scored["fd_vs"][client_node(k)]
        return out

    # before: the model each client starts from (the global one is sampled once and scored against every client)
    if not personal:
        g = score(starts["global"])
        before = {client_node(k): row(g, k) for k in clients}
    else:
        before = {client_node(k): row(score(starts[client_node(k)], k), k) for k in clients}

    # fine-tune each client on its own data; nothing is sent
    spec = replace(exp.runtime.spec, local_steps=pcfg.steps, warmup_steps=0, lr=pcfg.lr or exp.runtime.spec.lr)
    after: dict[str, dict[str, Any]] = {}
    for k in clients:
        node = client_node(k)
        model.load_state_dict(starts["global"] if not personal else starts[node])
        frozen = _frozen(model, pcfg.groups)
        try:
            gen = torch_generator(exp.device, cfg.run.seed, "personalize", k)
            with global_rng(exp.device, cfg.run.seed, "personalize-dropout", k):
                result = train_local(model, exp.client_data[k].images, spec, exp.scheduler, gen)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        trained = clone_state(model.state_dict())
        after[node] = {**row(score(trained, k), k), "train_loss": result.loss}
        if k in ess:
            after[node]["own_reference_images"] = round(ess[k], 1)
        model.load_state_dict(trained)
        if cfg.eval.grid_size:
            grid = evaluator.sample_grid(model, samples / f"personalized-{node}.png")
            after[node]["grid"] = str(grid.relative_to(sim.run_dir.path))
        save_pipeline(model, spec_now, exp.scheduler, sim.run_dir.path / MODELS_DIR / node)
        line = f"personalize {node}: {pcfg.steps} steps, train loss {result.loss:.4f}"
        for key, label in (("heldout_loss", "heldout"), ("fd", "FD"), ("fd_own", "FD own")):
            if key in after[node]:
                line += f"  {label} {before[node].get(key, float('nan')):.4f} -> {after[node][key]:.4f}"
        log(line)

    sent = server.ledger.close_round()["bytes"]  # the phase sends nothing: the ledger says so
    own = None
    if refs:
        own = "the reference split reweighted to each client's label shares"
        if cfg.eval.reference_split == "train":
            own += " (the train split: it holds the clients' own training images)"
        if cfg.eval.federated_reference:
            own += "; the global FD is against the clients' summed train statistics, not this split"
    record = {
        "rounds": rounds_done, "steps": pcfg.steps, "groups": pcfg.groups or ["all"],
        "lr": spec.lr, "start": "personal models" if personal else (
            "the EMA" if cfg.ema.rule != "off" else "the global model"),
        "clients": {node: {"before": before[node], "after": after[node]} for node in after},
        "summary": {"before": summarize({n: before[n] for n in after}), "after": summarize(after)},
        "protocol": evaluator.quality[1] if evaluator.quality else None,
        "own_reference": own,
        "bytes": sent, "bytes_total": sum(sum(d.values()) for d in sent.values()),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    sim.run_dir.write_json(PHASE_FILE, record)
    return record


def personalize(path: str | Path, overrides: list[str] = (), clients: list[int] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """``feddiff personalize``: the phase on a run folder's newest checkpoint (``personalize.*``, ``eval.*``
    overrides)."""
    from feddiff.engines.runner import restored

    sim, done = restored(path, list(overrides), "personalize", "feddiff personalize")
    if sim.cfg.personalize.steps == 0:
        raise ConfigError("personalize.steps is 0: give the fine-tuning steps (--steps N)")
    return run_phase(sim, done, sim.cfg.personalize, clients, log)


__all__ = ["MODELS_DIR", "PHASE_FILE", "client_references", "personalize", "run_phase"]
