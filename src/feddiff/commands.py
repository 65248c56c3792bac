"""What each CLI command does, as small functions over library calls (kept apart from parsing)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from feddiff.config import ConfigError, describe, load_config, load_resolved
from feddiff.data.partition import PartitionError
from feddiff.data.sources import DatasetError
from feddiff.runs import RunDir, RunError

USER_ERRORS = (ConfigError, DatasetError, PartitionError, RunError)


def _console() -> Console:
    # logs and pipes get 160 columns (rich's 80 would fold tables); terminals their own width
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def cmd_run(args: argparse.Namespace) -> int:
    from feddiff.engines.runner import resume, run

    if args.resume:
        if args.config:
            raise ConfigError("give either CONFIG or --resume RUN_DIR, not both (a resume reads RUN_DIR/config.json)")
        resume(args.resume, args.overrides)
        return 0
    if not args.config:
        raise ConfigError("feddiff run needs a CONFIG file (or --resume RUN_DIR)")
    cfg = load_config(args.config, args.overrides)
    if cfg.sweep.grid or cfg.sweep.variants:
        from feddiff.sweep import expand

        _console().print(f"note: {args.config} defines a sweep of {len(expand(cfg))} runs; `feddiff run` trains "
                         f"its base point only (`feddiff sweep {args.config}` runs the grid)")
    run(cfg, args.out)
    return 0


def _sampling_model(run_dir: RunDir, cfg, client: int | None):
    """The model to sample from and where it came from: an export, else the newest checkpoint.

    Personal-model runs (UDEC/ULATDEC) need ``client``: its export, or its personal model in the
    checkpoint with the global shared part merged in (the model it would start the next round from).
    A checkpoint is read through the run's own strategy (with its wrappers), never by its key layout.
    """
    from feddiff.algorithms import StrategyContext, make_strategy
    from feddiff.client.runtime import ClientState
    from feddiff.engines.experiment import model_spec
    from feddiff.model.export import load_unet
    from feddiff.model.spec import ModelSpec, build_model
    from feddiff.prune.structure import to_spec
    from feddiff.types import client_node, under

    strategy = make_strategy(cfg, StrategyContext(cfg.partition.num_clients, cfg.run.seed))
    exported = sorted(p.name for p in (run_dir.path / "models").glob("client*"))
    if client is not None and not strategy.personalized:
        raise ConfigError(f"--client applies to personal-model runs (udec, ulatdec); this run is "
                          f"{cfg.algorithm.name!r}, which trains one global model")
    folder = run_dir.model_path if client is None else run_dir.path / "models" / client_node(client)
    if (folder / "unet").is_dir():
        try:
            return load_unet(folder / "unet"), str(folder)
        except Exception as err:  # noqa: BLE001 - diffusers and safetensors raise many kinds for a bad file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"warning: the exported model {folder / 'unet'} is damaged ({reason[:200]}); sampling from the "
                  "newest readable checkpoint instead", file=sys.stderr)
    if client is None and strategy.personalized:
        have = exported or "the checkpoint's clients"
        raise RunError(f"{run_dir.path} is a {cfg.algorithm.name} run with one model per client ({have}); "
                       "choose one with --client K")
    damaged: list[tuple[Path, str]] = []
    found = run_dir.latest_checkpoint(damaged)
    if found is None:
        why = "".join(f"\n  {reason}" for _, reason in damaged)
        what = f"none of its {len(damaged)} checkpoints is readable" if damaged else "it has no checkpoint"
        raise RunError(f"{run_dir.path} has no exported model and {what}: nothing to sample from{why}")
    for _, reason in damaged:
        print(f"warning: {reason}; using the older checkpoint of round {found[0]}", file=sys.stderr)
    rnd, tensors, state = found
    strategy.load_state_dict(under(tensors, "strategy/"), state["strategy"])
    weights = strategy.global_state()
    in_channels = int(weights["conv_in.weight"].shape[1])
    source = f"checkpoint after round {rnd}"
    if client is not None:
        held = sorted(int(k) for k, meta in state["clients"].items() if k.isdigit() and meta["has_personal"])
        if client not in held:
            raise RunError(f"{run_dir.path}: client {client} has no personal model after round {rnd}; "
                           f"clients with one: {held or 'none'}")
        saved = ClientState.from_flat(tensors, state["clients"][str(client)], f"client/{client}/")
        held = ModelSpec.from_json(saved.spec) if saved.spec is not None else model_spec(cfg, in_channels)
        current = strategy.spec or model_spec(cfg, in_channels)
        weights = strategy.personal_model(to_spec(saved.personal, held, current))
        source += f", client {client}"
    spec = strategy.spec or model_spec(cfg, in_channels)
    model = build_model(spec, 0)
    model.load_state_dict(weights)
    return model, source


def cmd_sample(args: argparse.Namespace) -> int:
    from feddiff.data.transforms import make_grid, save_png, to_uint8
    from feddiff.engines.experiment import pick_device
    from feddiff.model.diffusion import make_scheduler, sample
    from feddiff.seeding import torch_generator

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    if Path(args.out).suffix.lower() != ".png" or Path(args.out).is_dir():
        raise ConfigError(f"--out must name a .png file, got {args.out!r}")
    run_dir = RunDir.open(args.run_dir)
    cfg = load_resolved(run_dir.config_path)
    d = cfg.diffusion
    steps = cfg.eval.num_inference_steps if args.steps is None else args.steps
    if not 0 <= steps <= d.num_train_timesteps:
        raise ConfigError(f"--steps must be 1..{d.num_train_timesteps} (the training timesteps), or 0 for all of "
                          f"them; got {steps}")
    device = pick_device(cfg.run.device)
    model, source = _sampling_model(run_dir, cfg, args.client)
    model.to(device)
    sched = make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
    images = sample(model, sched, args.num, torch_generator(device, args.seed, "sample-cli"),
                    args.sampler or cfg.eval.sampler, steps, cfg.eval.timestep_spacing)
    out = save_png(make_grid(to_uint8(images).cpu()), args.out, scale=max(1, -(-64 // images.shape[-1])))
    _console().print(f"{args.num} images from {source} -> {out}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    import numpy as np

    from feddiff.engines.experiment import load_split, partition_record, partition_train

    cfg = load_config(args.config, args.overrides)
    train = load_split(cfg, "train")  # as `feddiff run` reads it
    _, parts = partition_train(cfg, train.labels.numpy())
    record = partition_record(cfg, train, parts)  # what the run's partition.json will hold
    hist = np.array(record["label_histograms"])
    p = cfg.partition
    params = {"dirichlet": f"alpha={p.alpha}", "quantity": f"alpha={p.alpha}",
              "pathological": f"k={p.classes_per_client}, rule={p.shard_rule}"}.get(p.method, "")
    table = Table(title=f"{cfg.data.dataset}: {p.method} {params} over {p.num_clients} clients (seed {cfg.run.seed})")
    table.add_column("client", justify="right")
    table.add_column("size", justify="right")
    for i, name in enumerate(train.class_names):
        table.add_column(f"{i}", justify="right", header_style="bold", min_width=4)
    for k, row in enumerate(hist):
        table.add_row(str(k), str(int(row.sum())), *[str(int(c)) if c else "." for c in row])
    table.add_row("all", str(int(hist.sum())), *[str(int(c)) for c in hist.sum(0)], style="bold")
    if record["unused_samples"]:
        table.add_row("unused", str(record["unused_samples"]),
                      *[str(c) if c else "." for c in record["unused_per_class"]], style="red")
    console = _console()
    console.print(table)
    console.print("classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(train.class_names)))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    console = _console()
    if args.config or args.overrides:
        cfg = load_config(args.config, args.overrides)
        console.print_json(json.dumps(cfg.model_dump(mode="json")))
        return 0
    table = Table(title="feddiff config keys (a TOML config sets only what differs from these defaults)")
    for col in ("key", "default", "meaning"):
        table.add_column(col)
    for key, default, doc in describe():
        table.add_row(key, escape(default), escape(doc))  # "[fedprox] ..." is text, not rich markup
    console.print(table)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from feddiff.metrics.cost import model_cost
    from feddiff.model.presets import build_unet, unet_kwargs

    try:  # unet_kwargs names an unknown preset and an unfit size
        kwargs = unet_kwargs(args.preset, args.channels, args.image_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cost = model_cost(build_unet(kwargs, 0), args.channels, args.image_size)
    console = _console()
    console.print(f"[bold]{args.preset}[/bold]: UNet2DModel, channels {list(kwargs['block_out_channels'])}, "
                  f"{kwargs['layers_per_block']} resnet(s) per level, blocks {list(kwargs['down_block_types'])}")
    console.print(f"parameters {cost['parameters'] / 1e6:.3f} M ({cost['parameters']:,})   "
                  f"MACs {cost['macs'] / 1e9:.3f} G per image at {args.channels}x{args.image_size}x{args.image_size}   "
                  f"fp32 size {4 * cost['parameters'] / 1e6:.2f} MB")
    table = Table(title="parameter groups (what USPLIT / UDEC / ULATDEC share)")
    for col in ("group", "modules", "parameters", "share"):
        table.add_column(col, justify="right" if col in ("parameters", "share") else "left")
    modules = {"encoder": "conv_in, time_embedding, down_blocks", "latent": "mid_block",
               "decoder": "up_blocks, conv_norm_out, conv_out"}
    for g, v in cost["groups"].items():
        table.add_row(g, modules[g], f"{v['parameters']:,}", f"{100 * v['share']:.1f}%")
    console.print(table)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from feddiff.metrics.cost import count_params_macs
    from feddiff.model.diffusion import make_scheduler
    from feddiff.model.export import save_pipeline
    from feddiff.model.presets import unet_kwargs
    from feddiff.model.spec import ModelSpec, build_model
    from feddiff.prune.structure import prune_model

    if args.out and len(args.ratio) != 1:
        raise ConfigError(f"--out saves one pruned model; give one --ratio, not {len(args.ratio)}")
    try:
        spec = ModelSpec(unet_kwargs(args.preset, args.channels, args.image_size))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    params0, macs0 = count_params_macs(build_model(spec, args.seed), args.channels, args.image_size)
    console = _console()
    table = Table(title=f"{args.preset} at {args.channels}x{args.image_size}x{args.image_size}: structured pruning "
                        "(group L2 magnitude, conv_out kept; channels of GroupNorm layers step by group)")
    for col in ("ratio", "parameters", "kept", "MACs", "kept ", "widths per level", "history"):
        table.add_column(col, justify="left" if col.startswith("widths") else "right")
    levels = [int(c) for c in spec.unet["block_out_channels"]]
    table.add_row("0", f"{params0 / 1e6:.3f} M", "100.0%", f"{macs0 / 1e9:.3f} G", "100.0%", str(levels), "-")
    for ratio in args.ratio:
        model = build_model(spec, args.seed)
        step = prune_model(model, ratio)
        params, macs = count_params_macs(model, args.channels, args.image_size)
        widths = [int(b.resnets[0].conv1.out_channels) for b in model.down_blocks]
        table.add_row(f"{ratio:g}", f"{params / 1e6:.3f} M", f"{100 * params / params0:.1f}%", f"{macs / 1e9:.3f} G",
                      f"{100 * macs / macs0:.1f}%", str(widths), f"{len(json.dumps(step['history'])) / 1e3:.1f} KB")
        if args.out:
            sched = make_scheduler(1000, "linear", 1e-4, 0.02)
            out = save_pipeline(model, spec.with_step(step), sched, args.out)
    console.print(table)
    if args.out:
        console.print(f"pruned model -> {out} (load it with feddiff.model.export.load_pipeline)")
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from feddiff.engines.flower import require_flwr

    require_flwr()
    from feddiff.engines.flower.local import run_local

    cfg = load_config(args.config, args.overrides)
    folder = Path(args.out) if args.out else Path(cfg.run.out_dir) / f"{cfg.run.name or Path(args.config).stem}-flower-{time.strftime('%Y%m%d-%H%M%S')}"
    edges = args.edges.split(",") if args.edges else None
    console = _console()
    console.print(f"Flower deployment in {folder}: 1 SuperLink + {cfg.partition.num_clients} SuperNodes on loopback "
                  f"(logs in {folder}/logs)")
    own = None
    if args.own_data is not None:
        own = [d for d in args.own_data.split(",") if d.strip()]
        if not own:
            raise ConfigError(f"--own-data {args.own_data!r}: give one folder per node, separated by commas")
    run_path = run_local(cfg, folder, edges=edges, timeout_s=args.timeout, round_timeout_s=args.round_timeout,
                         workers=not args.no_workers, own_data=own)
    console.print(f"run folder: {run_path}")
    return 0


def cmd_flower_worker(args: argparse.Namespace) -> int:
    from feddiff.engines.flower.worker import main

    argv = ["--socket", args.socket] + (["--slots", str(args.slots)] if args.slots else []) + \
        (["--idle-exit", str(args.idle_exit)] if args.idle_exit else [])
    try:
        return main(argv)
    except KeyboardInterrupt:  # how a worker started by hand is stopped
        return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from feddiff.report import compare, summarize_run, table
    from feddiff.runs import atomic_write_json
    from feddiff.sweep import plan, point_settings, run_sweep, sweep_runs

    console = _console()
    if args.summary or args.resume:
        flag = "--summary" if args.summary else "--resume"
        extra = [name for name, given in (("CONFIG", args.config), ("--set", args.overrides), ("--out", args.out),
                                          ("--dry-run", args.dry_run), ("--resume", args.summary and args.resume))
                 if given]
        if extra:
            why = ("a summary only reads SWEEP_DIR" if args.summary
                   else "a sweep resumes with the settings it started with, saved in SWEEP_DIR/sweep.json")
            raise ConfigError(f"{flag} SWEEP_DIR takes no {', '.join(extra)}: {why}")
    if args.summary:
        folder = Path(args.summary)
    elif args.resume:
        folder = run_sweep("", [], resume_dir=args.resume)
    else:
        if not args.config:
            raise ConfigError("feddiff sweep needs a CONFIG with a [sweep] grid (or --resume / --summary SWEEP_DIR)")
        if args.dry_run:
            _, _, points, _ = plan(args.config, args.overrides)  # every point's config is checked first
            for p in points:
                console.print(escape(f"{p.name}: {' '.join(p.overrides)}"))
            console.print(f"{len(points)} runs")
            return 0
        folder = run_sweep(args.config, args.overrides, args.out)
    points = sweep_runs(folder)
    started = [(name, path) for name, _, path in points if (path / "config.json").exists()]
    rows = compare([summarize_run(path, name) for name, path in started],
                   settings={name: point_settings(overrides) for name, overrides, _ in points})
    atomic_write_json(folder / "summary.json", rows)
    console.print(table(rows, f"sweep {folder}"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from feddiff.report.document import build_report

    report = build_report(args.runs, args.out, args.title)
    console = _console()
    console.print(escape(f"{len(report.rows)} run(s), {len(report.figures)} figure(s), "
                         f"{sum(map(len, report.grids.values()))} sample grid(s)"))
    for path in (report.html, report.markdown, report.summary):
        console.print(escape(str(path)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from feddiff.engines.runner import evaluate_checkpoint

    overrides = [f"eval.fid_num_samples={args.num_samples}", f"eval.grid_size={args.grid}"]
    for key, value in (("feature_net", args.feature_net), ("sampler", args.sampler),
                       ("num_inference_steps", args.steps), ("reference_split", args.reference_split)):
        if value is not None:
            overrides.append(f"eval.{key}={json.dumps(value)}")
    if args.federated_reference:
        overrides.append("eval.federated_reference=true")
    record = evaluate_checkpoint(args.run_dir, args.round, overrides + args.overrides)
    ev = record["eval"]
    console = _console()
    rows = ev.get("models", {"global": ev})
    table = Table(title=f"{args.run_dir}: round {record['round']} ({ev.get('label', 'FD')}, "
                        f"{ev.get('protocol', {}).get('num_generated', 0)} samples)")
    for col in ("model", "heldout loss", ev.get("label", "FD"), "KID", "IS"):
        table.add_column(col, justify="left" if col == "model" else "right")
    fmt = lambda r, k, spec: format(r[k], spec) if k in r else "-"  # noqa: E731
    for name, r in rows.items():
        table.add_row(name, fmt(r, "heldout_loss", ".4f"), fmt(r, "fd", ".3f"), fmt(r, "kid_mean", ".4f"),
                      fmt(r, "is_mean", ".3f"))
    console.print(table)
    if "protocol" in ev:
        console.print("protocol: " + json.dumps(ev["protocol"]))
    console.print(f"appended to {Path(args.run_dir) / 'evals.jsonl'}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"{what} must name each client once, at least one (e.g. 0,2), got {text!r}")
    return out


def cmd_personalize(args: argparse.Namespace) -> int:
    from feddiff.engines.personalize import personalize

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"personalize.steps={args.steps}")
    if args.groups is not None:
        overrides.append(f"personalize.groups={json.dumps([g.strip() for g in args.groups.split(',') if g.strip()])}")
    if args.lr is not None:
        overrides.append(f"personalize.lr={args.lr}")
    clients = _int_list(args.clients, "--clients") if args.clients is not None else None
    console = _console()
    record = personalize(args.run_dir, overrides, clients, log=lambda m: console.print(escape(m)))
    table = Table(title=f"{args.run_dir}: {record['steps']} fine-tuning steps per client from {record['start']} "
                        f"({', '.join(record['groups'])}); 0 bytes sent")
    cols = [("heldout_loss", "held-out loss", ".4f"), ("fd", "FD", ".3f"), ("fd_own", "FD own", ".3f")]
    table.add_column("client")
    for _, label, _ in cols:
        table.add_column(f"{label} before", justify="right")
        table.add_column(f"{label} after", justify="right")
    for node, r in record["clients"].items():
        cells = [node]
        for key, _, spec in cols:
            cells += [format(r[side][key], spec) if key in r[side] else "-" for side in ("before", "after")]
        table.add_row(*cells)
    console.print(table)
    console.print(f"written: {Path(args.run_dir) / 'personalize.json'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from feddiff.engines.audit import audit

    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"audit.num_samples={args.num_samples}")
    if args.threshold is not None:
        overrides.append(f"audit.threshold={args.threshold}")
    clients = _int_list(args.clients, "--clients") if args.clients is not None else None
    console = _console()
    rec = audit(args.run_dir, overrides, clients, log=lambda m: console.print(escape(m)))
    c = rec["criterion"]
    table = Table(title=f"{args.run_dir}: {rec['num_samples']} samples of {rec['model']}; near-copy: d1 / "
                        f"({c['alpha']:g} x mean of {c['neighbours']} nearest) < {c['threshold']:g}")
    for col in ("client", "train images", "nearest (pixels)", "nearest (features)", "near-copies", "membership AUC",
                "TPR @ 1% FPR"):
        table.add_column(col, justify="left" if col == "client" else "right")
    fmt = lambda r, k, spec: format(r[k], spec) if k in r else "-"  # noqa: E731
    for node, r in rec["clients"].items():
        table.add_row(node, str(r["train_images"]), fmt(r, "nn_pixel_min", ".4f"), fmt(r, "nn_feature_min", ".3f"),
                      f"{r['near_copies']} ({100 * r['near_copy_fraction']:.1f}%)", fmt(r, "mia_auc", ".3f"),
                      fmt(r, "mia_tpr_at_1pct_fpr", ".3f"))
    console.print(table)
    if rec.get("dp"):
        console.print(f"privacy budget of the run: epsilon {rec['dp']['epsilon']:g} at delta {rec['dp']['delta']:g}")
    for note in rec["notes"]:
        console.print(escape(f"note: {note}"))
    flagged = rec["flagged"]
    console.print(escape(f"flagged (a near-copy of their images): {', '.join(flagged) if flagged else 'none'}"))
    console.print(f"written: {Path(args.run_dir) / 'audit.json'}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from feddiff.engines.evaluate import DOMAIN_NET_SEED, cache_dir
    from feddiff.config import EvalConfig
    from feddiff.metrics.features import train_domain_classifier

    cdir = args.cache_dir or str(cache_dir(EvalConfig()))
    console = _console()
    seed = DOMAIN_NET_SEED if args.seed is None else args.seed
    res = train_domain_classifier(args.dataset, args.root, cdir, seed=seed, epochs=args.epochs,
                                  retrain=args.retrain, log=console.print)
    verb = "cached" if res.cached else f"trained in {res.seconds:.0f} s"
    console.print(f"domain feature network for {args.dataset}: test accuracy {100 * res.test_accuracy:.2f}% ({verb})")
    console.print(f"weights: {res.path}")
    return 0


COMMANDS = {"run": cmd_run, "sample": cmd_sample, "partition": cmd_partition, "config": cmd_config,
            "model-info": cmd_model_info, "prune": cmd_prune, "flower": cmd_flower, "flower-worker": cmd_flower_worker, "sweep": cmd_sweep, "report": cmd_report, "eval": cmd_eval, "features": cmd_features,
            "personalize": cmd_personalize, "audit": cmd_audit}
