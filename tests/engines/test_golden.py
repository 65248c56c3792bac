"""Golden equality: the round-protocol redesign (issue 9) must not change any result.

``golden_hashes.json`` was recorded at fa14d06, before the redesign: the SHA-256 of the final exported
weights (the global model, and each client's personal model for UDEC/ULATDEC) of a tiny 3-round run for
every algorithm with three link settings, and of a run resumed after round 1. A change that moves any
of them changes the training math; if a fix must, say which and why here.

Regenerate (only on purpose): ``FEDDIFF_WRITE_GOLDEN=1 pytest tests/engines/test_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from feddiff.engines.runner import resume, run

GOLDEN = Path(__file__).with_name("golden_hashes.json")
ALGORITHMS = ("fedavg", "fedprox", "usplit", "udec", "ulatdec")
LINKS = {
    "identity": {},
    "int8-delta-ef": {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True},
                      "downlink": {"codec": "int8", "mode": "delta"}},
    "int4": {"uplink": {"codec": "int4", "scheme": "channel"}, "downlink": {"codec": "int4"}},
    # FedDM-quant's uplink alone: deltas against a downlink that arrives exactly (added later, recorded at fa14d06)
    "int8-up-delta-ef": {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True}},
}


def weights_hash(path: Path) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor of a safetensors file, in name order."""
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as fh:
        for k in sorted(fh.keys()):
            t = fh.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_hashes(run_path: Path) -> dict[str, str]:
    out = {}
    unet = "unet/diffusion_pytorch_model.safetensors"
    if (run_path / "model" / unet).exists():
        out["global"] = weights_hash(run_path / "model" / unet)
    for folder in sorted((run_path / "models").glob("client*")):
        out[folder.name] = weights_hash(folder / unet)
    return out


def golden_config(make_config, algorithm: str, link: str, num_rounds: int = 3):
    algo = {"name": algorithm, "fraction": 0.75}
    if algorithm == "fedprox":
        algo["mu"] = 0.1
    return make_config(
        run={"num_rounds": num_rounds}, partition={"num_clients": 4}, model={"dropout": 0.1},
        algorithm=algo, compress=LINKS[link],
        eval={"grid_size": 0, "loss_num_samples": 0},
    )


def _check(key: str, got: dict[str, str]) -> None:
    if os.environ.get("FEDDIFF_WRITE_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[key] = got
        GOLDEN.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
        return
    expected = json.loads(GOLDEN.read_text())[key]
    assert got == expected


@pytest.mark.parametrize("link", list(LINKS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_final_weights(make_config, algorithm, link):
    rd = run(golden_config(make_config, algorithm, link))
    got = run_hashes(rd.path)
    assert "global" in got or len(got) >= 3
    _check(f"{algorithm}/{link}", got)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_resume_after_round_1(make_config, algorithm):
    rd = run(golden_config(make_config, algorithm, "int8-delta-ef", num_rounds=1))
    resume(rd.path, ["run.num_rounds=3"])
    got = run_hashes(rd.path)
    _check(f"{algorithm}/int8-delta-ef", got)  # the same hashes as the uninterrupted run
