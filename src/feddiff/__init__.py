"""feddiff: federated training of diffusion models.

Quick use::

    from feddiff.config import load_config
    from feddiff.engines.runner import run

    run_dir = run(load_config("configs/quickstart.toml"))
"""

import os

# Nothing is fetched at run time: without this, diffusers retries a missing hub for a long time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
