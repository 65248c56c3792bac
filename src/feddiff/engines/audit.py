"""Leakage audit: how close a trained model's samples come to each client's training images.

``feddiff audit RUN_DIR`` (or ``[audit] enabled = true``, after the last round) answers the first
question of a cross-silo participant: does the shared model give my images away? For each client, with
the model the run releases (the global model or its EMA; for UDEC/ULATDEC each client's own model):

- ``num_samples`` images are generated (fixed noise, the run's sampler);
- nearest-neighbour distances from each to the client's training images, in pixel space (RMS over
  pixels in [0, 1]) and in the feature space of the evaluation network;
- the fraction of generated images that are near-copies by Carlini et al.'s normalised criterion
  (``metrics/leakage.py``; ``alpha``, ``neighbours``, ``threshold`` configurable), and the closest
  pairs as an image strip (top row generated, bottom row the training image) in ``audit/``;
- a loss-threshold membership-inference attack: the denoising loss of up to ``mia_num_images`` of the
  client's training images against as many held-out test images with the same labels (so the attack
  cannot tell the client's classes from membership), at fixed timesteps and noise; its ROC AUC and the
  true positive rate at 1% false positives.

A client is ``flagged`` when any generated image is a near-copy of one of its images. The record goes
to ``RUN_DIR/audit.json`` with the run's privacy budget when it had one (``[dp]``), so ``feddiff report``
can set the measured leakage beside epsilon. The audit reads every client's images: it runs where the
data is (the simulator's machine, or each site for its own data); nothing is sent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from feddiff.config import AuditConfig, ConfigError
from feddiff.data.transforms import make_grid, save_png, to_model_range, to_uint8
from feddiff.metrics.leakage import feature_distances, membership_auc, near_copies, nearest, tpr_at_fpr
from feddiff.model.diffusion import sample
from feddiff.runs import RunError
from feddiff.seeding import numpy_rng, torch_generator
from feddiff.types import client_node

AUDIT_FILE = "audit.json"
AUDIT_DIR = "audit"
CRITERION_SOURCE = ("Carlini et al. 2023, Extracting Training Data from Diffusion Models, section 5 (alpha 0.5, "
                    "n 50; the threshold 1 as public reimplementations read the paper, not checked against its text)")


@torch.no_grad()
def per_image_loss(model, images_u8: torch.Tensor, scheduler, timesteps: list[int], seed: int, tag: str,
                   batch_size: int = 128) -> torch.Tensor:
    """Each image's denoising MSE averaged over ``timesteps``, with noise fixed by (seed, tag, timestep)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(images_u8.shape[0], dtype=torch.float64)
    for t in timesteps:
        g = torch_generator("cpu", seed, "audit-noise", tag, t)
        noise_all = torch.randn(images_u8.shape, generator=g)
        for s in range(0, images_u8.shape[0], batch_size):
            x0 = to_model_range(images_u8[s : s + batch_size]).to(device)
            noise = noise_all[s : s + batch_size].to(device)
            steps = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
            eps = model(scheduler.add_noise(x0, noise, steps), steps).sample
            out[s : s + batch_size] += F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3)).double().cpu()
    model.train(was_training)
    return out / len(timesteps)


def matched_heldout(member_labels: torch.Tensor, test_labels: torch.Tensor, seed: int, tag: str) -> torch.Tensor:
    """Indices of test images with the members' labels, one per member: a class's test images in a seeded
    order, each used once before any is used again (a class with fewer test images than members repeats
    them as evenly as it can)."""
    rng = numpy_rng(seed, "audit-heldout", tag)
    out = torch.empty(len(member_labels), dtype=torch.long)
    for c in torch.unique(member_labels).tolist():
        want = (member_labels == c).nonzero().flatten()
        pool = (test_labels == c).nonzero().flatten().numpy()
        if len(pool) == 0:
            raise ValueError(f"the test split has no image of class {c}, which the client holds")
        order = rng.permutation(pool)
        picks = np.resize(order, len(want))  # the shuffled pool, repeated as often as needed
        out[want] = torch.from_numpy(picks).long()
    return out


def run_audit(sim, rounds_done: int, acfg: AuditConfig, clients: list[int] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Audit the run's released model(s) against each client's images; writes ``audit.json``."""
    from feddiff.engines.evaluate import load_feature_network
    from feddiff.metrics.quality import extract_features

    exp, server, cfg = sim.exp, sim.server, sim.cfg
    t0 = time.perf_counter()
    clients = exp.chosen_clients(clients)
    models = server.eval_models(sim.engine)
    net, notes = None, []
    if acfg.features:
        try:
            net = load_feature_network(cfg, exp.device, log=log)
        except ConfigError as err:
            notes.append(f"feature-space distances skipped: {err}")
    if exp.test is None:
        notes.append("membership inference skipped: the dataset has no test split for held-out images")
    model, e = server.working_model(), cfg.eval
    out_dir = sim.run_dir.path / AUDIT_DIR
    out_dir.mkdir(exist_ok=True)
    generated: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def samples_of(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name not in generated:  # the global model is sampled once for every client
            model.load_state_dict(models[name])
            g = torch_generator(exp.device, cfg.run.seed, "audit-samples", name)
            images = to_uint8(sample(model, exp.scheduler, acfg.num_samples, g, e.sampler, e.num_inference_steps,
                                     e.timestep_spacing)).cpu()
            feats = torch.from_numpy(extract_features(net, images)) if net is not None else None
            generated[name] = (images, feats)
        return generated[name]

    flip = cfg.data.random_flip  # a memorised image may come out mirrored: compare with both orientations

    def copies_of(fake: torch.Tensor, train: torch.Tensor):
        """Carlini et al.'s near-copies of ``fake`` among ``train`` (and its mirror images when training flipped)."""
        ref = torch.cat([train, train.flip(-1)]) if flip else train
        dist, idx = nearest(fake, ref, acfg.neighbours)
        nc = near_copies(dist, acfg.alpha, acfg.neighbours, acfg.threshold, indices=idx)
        return nc, nc.nearest % len(train)

    results: dict[str, dict[str, Any]] = {}
    for k in clients:
        node = client_node(k)
        name = node if exp.strategy.personalized else "global"
        if name not in models:
            notes.append(f"{node}: no personal model to audit (it never trained)")
            continue
        fake, fake_feats = samples_of(name)
        data = exp.client_data[k]
        train = data.images.cpu()
        if acfg.max_train_images and len(train) > acfg.max_train_images:
            idx = torch.from_numpy(numpy_rng(cfg.run.seed, "audit-train", k).choice(
                len(train), acfg.max_train_images, replace=False)).sort().values
            train, labels = train[idx], (data.labels[idx] if data.labels is not None else None)
        else:
            labels = data.labels
        r: dict[str, Any] = {"train_images": len(train)}

        # nearest neighbours in pixel space, and Carlini et al.'s near-copies
        nc, nearest_train = copies_of(fake, train)
        r.update(nn_pixel_mean=float(nc.distance.mean()), nn_pixel_min=float(nc.distance.min()),
                 ratio_min=float(nc.ratio.min()), near_copies=int(nc.copied.sum()), near_copy_fraction=nc.fraction,
                 neighbours=nc.neighbours)
        if fake_feats is not None:
            train_feats = torch.from_numpy(extract_features(net, train))
            fd, _ = nearest(fake_feats, train_feats, 1, distance=feature_distances)
            r.update(nn_feature_mean=float(fd.mean()), nn_feature_min=float(fd.min()))
        if exp.strategy.personalized:  # the federated threat: the other clients' models, through what is shared
            worst = None
            for other in models:
                if other == node:
                    continue
                o_nc, _ = copies_of(samples_of(other)[0], train)
                if worst is None or (int(o_nc.copied.sum()), -float(o_nc.ratio.min())) > (worst[1], -worst[2]):
                    worst = (other, int(o_nc.copied.sum()), float(o_nc.ratio.min()), float(o_nc.distance.min()))
            if worst is not None:
                r["others"] = {"model": worst[0], "near_copies": worst[1], "ratio_min": worst[2],
                               "nn_pixel_min": worst[3]}

        # the closest pairs: generated (top) over its nearest training image (bottom)
        order = torch.argsort(nc.ratio)[: acfg.strip_pairs]
        if len(order):
            pairs = torch.cat([fake[order], train[nearest_train[order]]])
            strip = save_png(make_grid(pairs, nrow=len(order)), out_dir / f"closest-{node}.png",
                             scale=max(1, -(-64 // fake.shape[-1])))
            r["strip"] = str(strip.relative_to(sim.run_dir.path))
            r["strip_ratios"] = [round(float(nc.ratio[i]), 4) for i in order]

        # loss-threshold membership inference against label-matched held-out images
        if exp.test is not None and labels is not None and acfg.mia_num_images:
            m = min(acfg.mia_num_images, len(train))
            pick = torch.from_numpy(numpy_rng(cfg.run.seed, "audit-members", k).choice(len(train), m, replace=False))
            members, member_labels = train[pick], labels[pick]
            try:
                held = exp.test.images[matched_heldout(member_labels, exp.test.labels, cfg.run.seed, node)].cpu()
            except ValueError as err:
                notes.append(f"{node}: membership inference skipped ({err})")
            else:
                model.load_state_dict(models[name])
                lm = per_image_loss(model, members, exp.scheduler, acfg.mia_timesteps, cfg.run.seed, f"{node}-in")
                lh = per_image_loss(model, held, exp.scheduler, acfg.mia_timesteps, cfg.run.seed, f"{node}-out")
                r.update(mia_auc=membership_auc(lm, lh), mia_tpr_at_1pct_fpr=tpr_at_fpr(lm, lh, 0.01),
                         mia_members=m, member_loss_mean=float(lm.mean()), heldout_loss_mean=float(lh.mean()))
        results[node] = r
        line = (f"audit {node}: nearest pixel distance {r['nn_pixel_min']:.4f} (mean {r['nn_pixel_mean']:.4f}), "
                f"near-copies {r['near_copies']}/{acfg.num_samples}")
        if "others" in r:
            line += f", {r['others']['near_copies']} from other clients' models"
        if "mia_auc" in r:
            line += f", membership AUC {r['mia_auc']:.3f}"
        log(line)
    if not results:
        raise RunError(f"{sim.run_dir.path}: no client's model could be audited ({'; '.join(notes) or 'no clients'})")

    metrics = sim.run_dir.read_metrics()  # the budget spent by the audited round (not a later one's)
    dp = next((m["dp"] for m in reversed(metrics) if "dp" in m and m.get("round", 0) <= rounds_done), None)
    record = {
        "rounds": rounds_done, "model": "personal models" if exp.strategy.personalized else (
            "the EMA" if cfg.ema.rule != "off" else "the global model"),
        "num_samples": acfg.num_samples, "sampler": {"name": e.sampler, "steps": e.num_inference_steps},
        "criterion": {"alpha": acfg.alpha, "neighbours": acfg.neighbours, "threshold": acfg.threshold,
                      "distance": "RMS over pixels in [0, 1]", "source": CRITERION_SOURCE},
        "mia": {"timesteps": list(acfg.mia_timesteps), "heldout": "test images with the members' labels"},
        "feature_net": getattr(net, "name", None),
        "clients": results,
        "summary": _summary(results),
        "flagged": sorted(n for n, r in results.items()
                          if r["near_copies"] > 0 or r.get("others", {}).get("near_copies", 0) > 0),
        "dp": dp, "notes": notes, "bytes": 0,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    sim.run_dir.write_json(AUDIT_FILE, record)
    return record


def _summary(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, how in (("near_copy_fraction", "mean max"), ("nn_pixel_min", "min"), ("nn_pixel_mean", "mean"),
                     ("nn_feature_min", "min"), ("mia_auc", "mean max"), ("mia_tpr_at_1pct_fpr", "mean max")):
        values = [r[key] for r in results.values() if key in r]
        if not values:
            continue
        for agg in how.split():
            out[f"{key}_{agg}"] = {"mean": sum(values) / len(values), "max": max(values), "min": min(values)}[agg]
    return out


def audit(path: str | Path, overrides: list[str] = (), clients: list[int] | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """``feddiff audit``: audit a run folder's newest checkpoint (``audit.*``, ``eval.*`` overrides)."""
    from feddiff.engines.runner import restored

    sim, done = restored(path, list(overrides), "audit", "feddiff audit")
    return run_audit(sim, done, sim.cfg.audit, clients, log)


__all__ = ["AUDIT_DIR", "AUDIT_FILE", "audit", "matched_heldout", "per_image_loss", "run_audit"]
