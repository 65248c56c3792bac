"""Throughput of the image-quality path on CPU: feature extraction and DDIM sampling.

Each path is timed against a plain forward pass of the same network in the same run:
- domain / inception features: ``extract_features`` (batching, [0, 1] conversion, resize to the
  net's input size, scaling to [-1, 1]) vs the bare network on inputs prepared beforehand;
- sampling: ``feddiff.model.diffusion.sample`` (DDIM, 50 steps) vs the same number of bare U-Net
  forward passes on a batch of the same size (no scheduler).
``ratio`` = our images/s / plain images/s (1.0 = no overhead); the top-level ``ratio`` is the
domain-net feature extraction. Weights are untrained / random: only the timing means anything.
Prints progress lines, then one JSON object as the last line. Runs on one thread unless
``--threads`` says otherwise (see its help).

    python bench/fid_throughput.py           # 4096 domain, 8 inception, 16 sampled images
    python bench/fid_throughput.py --quick   # 512 domain, 2 inception, 2 sampled images (< 30 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from feddiff.metrics.features import build_domain_net
from feddiff.metrics.inception import InceptionV3FID
from feddiff.metrics.quality import extract_features
from feddiff.model.diffusion import make_scheduler, sample
from feddiff.model.presets import build_unet, unet_kwargs

IMAGE_SIZE = 32  # what the fmnist preset samples (Fashion-MNIST padded 28 -> 32)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(
    name: str, n: int, ours: Callable[[], object], plain: Callable[[], object], repeats: int,
    warm_up: Callable[[], object] | None = None,
) -> dict:
    """Median seconds of each, alternating so that load changes hit both alike."""
    (warm_up or plain)()  # allocator, kernels
    ours_s, plain_s = [], []
    for _ in range(repeats):
        plain_s.append(timed(plain))
        ours_s.append(timed(ours))
        print(f"{name}: {n} images  ours {ours_s[-1]:.3f}s  plain {plain_s[-1]:.3f}s", flush=True)
    o, p = statistics.median(ours_s), statistics.median(plain_s)
    return {"images": n, "ours_s": round(o, 4), "plain_s": round(p, 4), "ours_images_per_s": round(n / o, 2),
            "plain_images_per_s": round(n / p, 2), "ratio": round(p / o, 4)}


@torch.no_grad()
def bench_domain(n: int, repeats: int, batch_size: int = 256) -> dict:
    net = build_domain_net(1, 28, 10, seed=0).eval()
    images = torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    prepared = net.prepare(images)  # plain: the input already at 28 px in [-1, 1]

    def plain() -> None:
        for s in range(0, n, batch_size):
            F.relu(net.fc1(net.trunk(prepared[s : s + batch_size])))

    return compare("domain", n, lambda: extract_features(net, images, batch_size=batch_size), plain, repeats)


@torch.no_grad()
def bench_inception(n: int, repeats: int, batch_size: int = 8) -> dict:
    torch.manual_seed(0)
    net = InceptionV3FID()
    images = torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    prepared = net.prepare(images)  # plain: 3 x 299 x 299 in [-1, 1], prepared beforehand

    def plain() -> None:
        for s in range(0, n, batch_size):
            net.pool3(prepared[s : s + batch_size])

    return compare("inception", n, lambda: extract_features(net, images, batch_size=batch_size), plain, repeats,
                   warm_up=lambda: net.pool3(prepared[:1]))


@torch.no_grad()
def bench_sampling(n: int, repeats: int, steps: int = 50) -> dict:
    model = build_unet(unet_kwargs("fmnist", 1, IMAGE_SIZE), seed=0).eval()
    sched = make_scheduler()
    x = torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    timesteps = torch.linspace(999, 0, steps).long()

    def ours() -> None:
        sample(model, sched, n, torch.Generator().manual_seed(0), "ddim", steps, batch_size=n)

    def plain() -> None:
        for t in timesteps:
            model(x, t).sample

    out = compare("sampling", n, ours, plain, repeats, warm_up=lambda: model(x, timesteps[0]))
    out.update(model="fmnist", sampler="ddim", num_inference_steps=steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run under 30 s")
    ap.add_argument("--repeats", type=int, default=None, help="measurements of each (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1; 0 = torch's choice). On a CPU shared with other "
                         "multi-threaded jobs, 2 threads on 2 cores stall at every op (the U-Net ran "
                         "~60x slower), so one thread gives stable timings")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    n_domain, n_inception, n_sample = (512, 2, 2) if args.quick else (4096, 8, 16)
    start = time.perf_counter()
    domain = bench_domain(n_domain, repeats)
    inception = bench_inception(n_inception, repeats)
    sampling = bench_sampling(n_sample, repeats)
    print(json.dumps({
        "bench": "fid_throughput", "mode": "quick" if args.quick else "full", "device": "cpu",
        "threads": torch.get_num_threads(), "image_size": IMAGE_SIZE, "repeats": repeats,
        "weights": "untrained domain net, randomly initialised InceptionV3 and U-Net: timing only",
        "domain": domain, "inception": inception, "sampling": sampling,
        "ratio": domain["ratio"], "wall_s": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
