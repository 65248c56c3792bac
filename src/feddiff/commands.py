"""What each CLI command does, as small functions over library calls (kept apart from parsing)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from feddiff.config import ConfigError, describe, load_config, load_resolved
from feddiff.data.partition import PartitionError
from feddiff.data.sources import DatasetError
from feddiff.runs import RunDir, RunError

USER_ERRORS = (ConfigError, DatasetError, PartitionError, RunError)


def cmd_run(args: argparse.Namespace) -> int:
    from feddiff.engines.simulator import resume, run

    if args.resume:
        if args.config:
            raise ConfigError("give either CONFIG or --resume RUN_DIR, not both (a resume reads RUN_DIR/config.json)")
        resume(args.resume, args.overrides)
        return 0
    if not args.config:
        raise ConfigError("feddiff run needs a CONFIG file (or --resume RUN_DIR)")
    cfg = load_config(args.config, args.overrides)
    run(cfg, args.out)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from diffusers import UNet2DModel

    from feddiff.data.transforms import make_grid, save_png, to_uint8
    from feddiff.experiment import model_kwargs, pick_device
    from feddiff.model.diffusion import make_scheduler, sample
    from feddiff.model.presets import build_unet
    from feddiff.seeding import torch_generator

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    run_dir = RunDir.open(args.run_dir)
    cfg = load_resolved(run_dir.config_path)
    device = pick_device(cfg.run.device)
    if (run_dir.model_path / "unet").is_dir():
        model = UNet2DModel.from_pretrained(run_dir.model_path / "unet")
        source = str(run_dir.model_path)
    else:
        found = run_dir.latest_checkpoint()
        if found is None:
            raise RunError(f"{run_dir.path} has neither a final model nor a checkpoint")
        rnd, tensors, _ = found
        channels = int(tensors["strategy/global/conv_in.weight"].shape[1])
        model = build_unet(model_kwargs(cfg, channels), 0)
        model.load_state_dict({k.removeprefix("strategy/global/"): v for k, v in tensors.items()
                               if k.startswith("strategy/global/")})
        source = f"checkpoint after round {rnd}"
    model.to(device)
    d = cfg.diffusion
    sched = make_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
    steps = cfg.eval.num_inference_steps if args.steps is None else args.steps
    images = sample(model, sched, args.num, torch_generator(device, args.seed, "sample-cli"),
                    args.sampler or cfg.eval.sampler, steps, cfg.eval.timestep_spacing)
    out = save_png(make_grid(to_uint8(images).cpu()), args.out, scale=max(1, -(-64 // images.shape[-1])))
    Console().print(f"{args.num} images from {source} -> {out}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from feddiff.data.partition import label_histograms
    from feddiff.data.sources import load_dataset
    from feddiff.experiment import partition_train

    cfg = load_config(args.config, args.overrides)
    train = load_dataset(cfg.data.dataset, cfg.data.root, "train")
    labels = train.labels.numpy()
    _, parts = partition_train(cfg, labels)
    hist = label_histograms(labels, parts, train.num_classes)
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
    console = Console()
    console.print(table)
    console.print("classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(train.class_names)))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    if args.config or args.overrides:
        cfg = load_config(args.config, args.overrides)
        console.print_json(json.dumps(cfg.model_dump(mode="json")))
        return 0
    table = Table(title="feddiff config keys (a TOML config sets only what differs from these defaults)")
    for col in ("key", "default", "meaning"):
        table.add_column(col)
    for key, default, doc in describe():
        table.add_row(key, default, doc)
    console.print(table)
    return 0


COMMANDS = {"run": cmd_run, "sample": cmd_sample, "partition": cmd_partition, "config": cmd_config}
