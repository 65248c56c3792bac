"""``feddiff``: the command line. Thin: parse, build a config, call one library function."""

from __future__ import annotations

import argparse
import os
import sys

HELP = """\
Federated training of diffusion models (DDPM) on data split across clients.

  feddiff run configs/quickstart.toml            train (embedded simulator)
  feddiff run configs/quickstart.toml --set train.lr=1e-3 --set run.num_rounds=5
  feddiff run --resume runs/quickstart-20261123-101500
  feddiff sample runs/quickstart-20261123-101500 --num 64 --out grid.png
  feddiff partition configs/quickstart.toml      per-client sizes and label counts, no training
  feddiff config [CONFIG]                        every config key with its default and meaning
  feddiff model-info cifar10-ddpm                parameters, MACs and encoder/latent/decoder shares
  feddiff prune cifar10-ddpm --ratio 0.1 0.2 0.3 parameters and MACs after structured pruning (FedPhD)
  feddiff sweep configs/degoede_fmnist.toml      a grid of runs (resumable), with a summary table
  feddiff report runs/a runs/b --out report      HTML + Markdown report: table, plots, sample grids (reads only)
  feddiff flower configs/smoke.toml              the same run on Flower: a SuperLink and one SuperNode per client
                                                 on loopback (real processes), then `flwr run`
  feddiff eval runs/quickstart-... --num-samples 1000   FD-domain / KID / IS of the final model
  feddiff features train --dataset fashion-mnist        the offline feature network for FD-domain
"""


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); VALUE is read as TOML, "
                        "e.g. 1e-3, true, \"iid\", [32, 64]")


# kept in step with feddiff.data.sources.DATASETS and feddiff.model.presets.PRESETS by a test
# (importing them here would load torch for every --help)
DATASET_NAMES = ("fashion-mnist", "cifar10", "celeba", "image-folder")
PRESET_NAMES = ("tiny", "small", "fmnist", "cifar10-ddpm")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a pruning ratio must be in (0, 1), got {text}")
    return value


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddiff", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="train a federated diffusion model (or resume one)",
                       description="Train from a TOML config in the embedded simulator, writing a run folder "
                                   "(config.json, partition.json, metrics.jsonl, samples/, checkpoints/, model/).")
    p.add_argument("config", nargs="?", help="TOML config (a diff against the defaults; see `feddiff config`)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--out", metavar="DIR", help="folder for run folders (default: run.out_dir, 'runs')")
    _add_set(p)

    p = sub.add_parser("sample", help="sample images from a trained run",
                       description="Generate images from a run's final model (or its latest checkpoint) "
                                   "into one PNG grid.")
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help="default: the run's eval.sampler")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the run's eval.num_inference_steps)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--client", type=int, default=None, help="UDEC/ULATDEC runs: sample client K's personal model")

    p = sub.add_parser("personalize", help="fine-tune a run's final model on each client's own data, and evaluate",
                       description="Each client fine-tunes the model it would sample from (the global model, its "
                                   "EMA, or its personal model) on its own train images; nothing is sent. Each "
                                   "model is evaluated against the reference split and against the client's own "
                                   "label distribution, before and after. Writes RUN_DIR/personalize.json, "
                                   "RUN_DIR/personalized/client<k> and samples/personalized-client<k>.png.")
    p.add_argument("run_dir", help="a run folder (simulator)")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="fine-tuning steps per client (default: the run's personalize.steps)")
    p.add_argument("--groups", default=None,
                   help="comma-separated parameter groups to fine-tune: encoder, latent, decoder (default: all)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the run's train.lr)")
    p.add_argument("--clients", default=None, help="comma-separated client ids (default: every client)")
    _add_set(p)

    p = sub.add_parser("audit", help="how close a run's samples come to each client's training images",
                       description="Generate images from the run's released model and compare them with each "
                                   "client's training images: nearest-neighbour distances (pixels, features), "
                                   "near-copies by Carlini et al. 2023's criterion with the closest pairs as an "
                                   "image strip, and a loss-threshold membership-inference AUC against "
                                   "label-matched held-out images. Writes RUN_DIR/audit.json and RUN_DIR/audit/.")
    p.add_argument("run_dir", help="a run folder (its clients' data must be readable here)")
    p.add_argument("--num-samples", type=_int_at_least(2), default=None,
                   help="generated images (default: the run's audit.num_samples)")
    p.add_argument("--threshold", type=float, default=None, help="near-copy threshold (default: audit.threshold)")
    p.add_argument("--clients", default=None, help="comma-separated client ids (default: every client)")
    _add_set(p)

    p = sub.add_parser("eval", help="FD / KID / IS (and held-out loss) of a run's checkpoint",
                       description="Evaluate the model of a checkpoint (default: the newest) with the run's eval "
                                   "settings, overridden by the options; personal models (UDEC/ULATDEC) one by one. "
                                   "Results are appended to RUN_DIR/evals.jsonl.")
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("--round", type=int, default=None, help="the checkpoint of this round (default: the newest)")
    p.add_argument("--num-samples", type=_int_at_least(2), required=True,
                   help="generated images per model for FD/KID/IS (at least 2)")
    p.add_argument("--feature-net", choices=["domain", "inception"], default=None,
                   help="domain: FD-domain (offline default); inception: FID (needs the local weights file)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    p.add_argument("--steps", type=_int_at_least(0), default=None, help="sampler steps (0: all T for DDPM)")
    p.add_argument("--reference-split", choices=["train", "test"], default=None)
    p.add_argument("--federated-reference", action="store_true",
                   help="reference statistics as sums computed by each client on its own images")
    p.add_argument("--grid", type=_int_at_least(0), default=0,
                   help="also save a grid of this many samples (default 0)")
    _add_set(p)

    p = sub.add_parser("features", help="train the offline domain feature network for FD-domain",
                       description="Train (once; then cached) the small classifier whose penultimate features give "
                                   "FD-domain / KID-domain, and print its test accuracy.")
    p.add_argument("action", choices=["train"], help="train")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES, help=" | ".join(DATASET_NAMES))
    p.add_argument("--root", default="", help="dataset folder (default: the dataset's default location)")
    p.add_argument("--seed", type=int, default=None, help="seed (default 0, the one runs use)")
    p.add_argument("--epochs", type=_int_at_least(1), default=3, help="training epochs (default 3)")
    p.add_argument("--cache-dir", default=None, help="default: $FEDDIFF_CACHE or ~/.cache/feddiff")
    p.add_argument("--retrain", action="store_true", help="train again even when cached")

    p = sub.add_parser("partition", help="print the per-client partition (sizes, label counts) without training",
                       description="Load the train split, partition it as configured and print one row per client.")
    p.add_argument("config", help="TOML config")
    _add_set(p)

    p = sub.add_parser("sweep", help="run every point of a config's [sweep] grid, resumably, and summarize",
                       description="Run the grid of CONFIG's [sweep] section (one run folder per point) and print a "
                                   "summary table with communication savings against FedAvg (FULL).")
    p.add_argument("config", nargs="?", help="TOML config with a [sweep.grid] table")
    p.add_argument("--resume", metavar="SWEEP_DIR",
                   help="continue a sweep: skip finished points, resume the rest (with the config and --set values "
                        "saved in SWEEP_DIR/sweep.json; takes no CONFIG, --set or --out)")
    p.add_argument("--summary", metavar="SWEEP_DIR", help="only print (and save) the summary of a sweep folder")
    p.add_argument("--out", metavar="DIR", help="folder for the sweep folder (default: run.out_dir)")
    p.add_argument("--dry-run", action="store_true", help="check every point's config, list the points and exit")
    _add_set(p)

    p = sub.add_parser("report", help="compare runs: an HTML page and a Markdown summary with the table, plots and "
                                      "sample grids (reads run folders only)",
                       description="Read run folders (a sweep folder stands for its runs) and write report.html "
                                   "(self-contained), report.md, figures/, grids/ and summary.json into --out. "
                                   "Never retrains; re-run it while runs train to see them so far.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders of runs (e.g. a sweep)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the report (created)")
    p.add_argument("--title", help="page title (default: the methods compared)")

    p = sub.add_parser("model-info", help="parameters, MACs and parameter-group shares of a model preset")
    p.add_argument("preset", choices=PRESET_NAMES, help=" | ".join(PRESET_NAMES))
    p.add_argument("--image-size", type=_int_at_least(8), default=32, help="resolution for MACs (default 32)")
    p.add_argument("--channels", type=_int_at_least(1), default=None,
                   help="image channels (default: 3 for cifar10-ddpm, else 1)")

    p = sub.add_parser("prune", help="parameters and MACs of a preset before and after structured pruning")
    p.add_argument("preset", choices=PRESET_NAMES, help=" | ".join(PRESET_NAMES))
    p.add_argument("--ratio", type=_ratio, nargs="+", required=True, metavar="R",
                   help="Torch-Pruning pruning ratio(s) in (0, 1); several print one row each")
    p.add_argument("--image-size", type=_int_at_least(8), default=32, help="resolution for MACs (default 32)")
    p.add_argument("--channels", type=_int_at_least(1), default=None,
                   help="image channels (default: 3 for cifar10-ddpm, else 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights that rank channels (default 0)")
    p.add_argument("--out", metavar="DIR", help="save the pruned model (one ratio) as a pipeline folder that "
                   "feddiff.model.export.load_pipeline reads")

    p = sub.add_parser("flower", help="train a config on a local Flower deployment (SuperLink + SuperNodes on "
                                      "loopback)")
    p.add_argument("config", help="TOML config file")
    p.add_argument("--out", metavar="DIR", help="deployment folder (Flower homes, app, logs; the run folder is "
                                                "DIR/run); default: a new folder under run.out_dir")
    p.add_argument("--edges", metavar="E0,E1,...", help="hierarchies: the edge-id each node declares, one per client")
    p.add_argument("--own-data", metavar="DIR0,DIR1,...",
                   help="one folder per node holding that node's own images (the config's data.dataset format): each "
                        "node trains on all of its folder, and the server reads none of the clients' images "
                        "(default: each node cuts its partition out of data.root)")
    p.add_argument("--timeout", type=_int_at_least(1), default=None, metavar="S", help="give up after S seconds")
    p.add_argument("--round-timeout", type=_int_at_least(1), default=None, metavar="S",
                   help="a client that has not answered a round's message after S seconds is that round's failure "
                        "(its message expires then); default: wait")
    p.add_argument("--no-workers", action="store_true",
                   help="no warm worker beside each SuperNode: every message's ClientApp imports torch and "
                        "rebuilds its client (the same results; measured on 2 cores: 1.6-1.8x the simulator's round "
                        "time instead of 1.3x)")
    _add_set(p)

    p = sub.add_parser("flower-worker", help="a node's warm worker, beside its Flower SuperNode (docs/flower.md)")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="Unix socket to listen on, in a directory only this user can enter; start the SuperNode "
                        "with --node-config '... worker=\"PATH\"'")
    p.add_argument("--slots", type=_int_at_least(1), default=None, metavar="N",
                   help="nodes sharing one machine: at most N of the workers whose sockets share this directory "
                        "train at once (cores / torch threads per node)")
    p.add_argument("--idle-exit", type=_int_at_least(1), default=None, metavar="S", help="exit after S seconds idle")

    p = sub.add_parser("config", help="print every config key with its default and description, or a resolved config")
    p.add_argument("config", nargs="?", help="a TOML config to resolve and print as JSON")
    _add_set(p)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one plain line for people (FEDDIFF_DEBUG=1 keeps Python's, with file and line)."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    original = warnings.formatwarning  # restored on return: main() is also called as a function
    if not os.environ.get("FEDDIFF_DEBUG"):  # the text only: whoever shows warnings still does
        warnings.formatwarning = _format_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = original


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("model-info", "prune") and args.channels is None:
        args.channels = 3 if args.preset == "cifar10-ddpm" else 1
    from feddiff.commands import COMMANDS, USER_ERRORS

    try:
        return COMMANDS[args.command](args) or 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # bad values or files met deeper down: a message, not a traceback
        if os.environ.get("FEDDIFF_DEBUG"):
            raise
        print(f"error: {err}\n(FEDDIFF_DEBUG=1 shows where it was raised)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with: feddiff run --resume <run folder>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

