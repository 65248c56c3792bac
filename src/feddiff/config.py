"""Typed run configuration: TOML files as diffs against defaults, dotted overrides, clear errors.

Every field has a default and a one-line description (``feddiff config`` prints them).
Unknown keys and wrong types are errors that name the key; the resolved config is saved
as ``config.json`` in every run folder and is what ``--resume`` reads back.
"""

from __future__ import annotations

import copy
import json
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


def F(default: Any, doc: str, **kw: Any) -> Any:  # noqa: N802 - short alias keeps the schema readable
    """A field with a default and its one-line description."""
    return Field(default, description=doc, **kw)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RunConfig(Section):
    name: str = F("", "run-folder name prefix; empty = the config file's name")
    seed: int = F(0, "root seed: model init, partition, client sampling, batches and noise derive from it")
    out_dir: str = F("runs", "folder that holds run folders")
    num_rounds: int = F(10, "communication rounds", ge=1)
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto = cuda when available, else cpu")
    num_threads: int = F(0, "torch CPU threads; 0 = torch's default", ge=0)
    deterministic: bool = F(
        True, "on CUDA: deterministic cuDNN/cuBLAS kernels, so a resumed run equals an uninterrupted one "
        "(slower); false = the fastest kernels, equal only to float tolerance. CPU runs are always exact"
    )
    checkpoint_every: int = F(1, "rounds between checkpoints; 0 = only the last round", ge=0)
    keep_checkpoints: int = F(2, "how many recent checkpoints to keep on disk", ge=1)
    progress: Literal["auto", "bar", "lines", "none"] = F(
        "auto", "auto = a live bar on a terminal, one line per round otherwise"
    )
    tensorboard: bool = F(False, "also write each round's numbers as TensorBoard scalars to RUN_DIR/tensorboard "
                                 "(needs the tensorboard package where the server runs)")


def _known_name(kind: str, name: str, known: dict[str, Any]) -> str:
    if name not in known:  # registries are imported lazily: config loads without torch
        raise ValueError(f"unknown {kind} {name!r}; choose from {sorted(known)}")
    return name


class DataConfig(Section):
    dataset: str = F("fashion-mnist", "dataset reader: fashion-mnist | cifar10 | celeba | image-folder")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from feddiff.data.sources import DATASETS

        return _known_name("dataset", v, DATASETS)
    root: str = F("", "folder with the dataset's files; empty = the dataset's default location")
    image_size: int = F(32, "side in pixels the model sees", ge=4)
    resize: Literal["pad", "resize", "center-crop"] = F(
        "pad", "how images reach image_size: pad (with black), bilinear resize, or center-crop then resize"
    )
    random_flip: bool = F(False, "random horizontal flip during training")
    max_train_samples: int = F(0, "use a seeded random subset of the train split; 0 = all", ge=0)


class PartitionConfig(Section):
    method: Literal["iid", "dirichlet", "pathological", "quantity"] = F(
        "iid", "how the train split is divided over clients"
    )
    num_clients: int = F(5, "number of clients (silos)", ge=1)
    alpha: float = F(0.5, "Dirichlet concentration (dirichlet: label skew; quantity: size skew)", gt=0)
    min_samples: int = F(10, "minimum samples per client; dirichlet/quantity resample until met", ge=1)
    classes_per_client: int = F(2, "pathological: classes each client holds", ge=1)
    shard_rule: Literal["random", "fedphd", "fedphd-proportional"] = F(
        "random", "pathological: random class choice (NIID-Bench #C=k), FedPhD's deterministic shards, or FedPhD's "
        "CelebA split (one class per client, clients per class in proportion to class size)"
    )
    seed: int | None = F(
        None, "seed of the data split (partition and data.max_train_samples subset); unset = run.seed"
    )


class ModelConfig(Section):
    preset: str = F("small", "UNet2DModel preset: tiny | small | fmnist | cifar10-ddpm")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from feddiff.model.presets import PRESETS

        return _known_name("preset", v, PRESETS)
    block_out_channels: list[int] | None = F(None, "override the preset's channels per level")
    layers_per_block: int | None = F(None, "override the preset's resnet layers per level", ge=1)
    norm_num_groups: int | None = F(None, "override the preset's GroupNorm groups", ge=1)
    attention_levels: list[int] | None = F(None, "override which levels (0 = highest resolution) have attention")
    dropout: float = F(0.0, "dropout in resnet blocks", ge=0, lt=1)


class DiffusionConfig(Section):
    num_train_timesteps: int = F(1000, "diffusion steps T", ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = F("linear", "beta schedule")
    beta_start: float = F(1e-4, "first beta", gt=0)
    beta_end: float = F(0.02, "last beta", gt=0, lt=1)
    loss: Literal["mse", "huber"] = F("mse", "loss on the predicted noise epsilon (huber = smooth L1, beta 1)")


class TrainConfig(Section):
    """Local training on each client, every round."""

    optimizer: Literal["adam", "sgd"] = F(
        "adam", "local optimizer: adam (betas adam_betas) or sgd (with momentum); SCAFFOLD's control variates are "
        "derived for plain SGD, with Adam they correct the gradient Adam then rescales (see docs/algorithms.md)"
    )
    lr: float = F(2e-4, "learning rate of the local optimizer", gt=0)
    momentum: float = F(0.0, "sgd: momentum (0 = plain SGD)", ge=0, lt=1)
    adam_betas: list[float] = F([0.9, 0.999], "Adam betas (beta1, beta2)", min_length=2, max_length=2)
    batch_size: int = F(32, "local batch size", ge=1)
    local_epochs: int = F(1, "passes over the client's data per round (ignored when local_steps > 0)", ge=1)
    local_steps: int = F(0, "optimizer steps per round; 0 = use local_epochs", ge=0)
    warmup_steps: int = F(0, "linear lr warm-up over each client's first optimizer steps (counted across rounds)", ge=0)
    grad_clip: float = F(1.0, "clip the gradient norm to this; 0 = off", ge=0)
    keep_optimizer_state: bool = F(
        False, "keep each client's optimizer state (Adam moments, SGD momentum) between rounds (default: fresh each round)"
    )
    optimizer_scope: Literal["client", "shared"] = F(
        "client", "client = each client its own optimizer; shared = one optimizer state and warm-up counter "
        "carried from client to client across rounds, as FedPhD's code does (an artefact of simulating in one "
        "process; the simulator only)"
    )
    lr_schedule: Literal["constant", "cosine"] = F(
        "constant", "lr across rounds: constant, or cosine decay from lr to lr * min_lr_ratio at the last round"
    )
    min_lr_ratio: float = F(0.1, "cosine schedule: final lr as a fraction of lr", ge=0, le=1)
    lr_schedule_rounds: int = F(
        0, "rounds the cosine schedule spans (0 = run.num_rounds); later rounds train at lr * min_lr_ratio", ge=0
    )
    precision: Literal["fp32", "bf16"] = F(
        "fp32", "bf16 = autocast matmuls/convs to bfloat16 (fast on GPUs and CPUs with AVX512-BF16/AMX)"
    )


class AlgorithmConfig(Section):
    """Fields every algorithm has; each algorithm's module subclasses it with ``name`` and its own fields
    and registers the subclass (``algorithms/registry.py``), so this file lists no algorithm."""

    name: str = F("fedavg", "algorithm (see `feddiff config` for the registered ones)")
    fraction: float = F(1.0, "fraction of clients sampled each round", gt=0, le=1)
    min_clients: int = F(1, "sample at least this many clients per round", ge=1)

    def global_fresh_after(self, rounds: int) -> str | None:
        """None when the global model after ``rounds`` rounds holds that round's training (structured pruning
        ranks channels on it); else why not (a hierarchy between central aggregations)."""
        return None


def algorithm_configs() -> dict[str, type[AlgorithmConfig]]:
    """name -> config class of every registered algorithm (importing them registers the built-in ones)."""
    from feddiff.algorithms import ALGORITHMS

    return {name: entry.config for name, entry in ALGORITHMS.items()}


class LinkConfig(Section):
    """How one direction of the client<->server link is encoded (``compress/channel.py``)."""

    codec: Literal["identity", "fp16", "bf16", "int8", "int4"] = F(
        "identity", "tensor codec: identity (fp32) | fp16 | bf16 | int8 | int4"
    )
    scheme: Literal["affine", "channel"] = F(
        "affine", "int8/int4 scales: per-tensor affine (min/max) or per-output-channel symmetric"
    )
    stochastic_rounding: bool = F(False, "int8/int4: unbiased stochastic rounding instead of round-to-nearest")
    mode: Literal["weights", "delta"] = F(
        "weights", "encode the tensors themselves, or their difference from the receiver's reference"
    )
    error_feedback: bool = F(False, "delta mode: keep what quantization dropped and add it to the next message")

    @model_validator(mode="after")
    def _consistent(self) -> LinkConfig:
        if self.error_feedback and self.mode != "delta":
            raise ValueError("error_feedback = true needs mode = \"delta\"")
        if self.codec not in ("int8", "int4") and (self.stochastic_rounding or self.scheme != "affine"):
            raise ValueError(f"scheme and stochastic_rounding apply to int8/int4 only, not codec {self.codec!r}")
        return self


class CompressConfig(Section):
    """Compression of every algorithm's messages, per direction (FedDM-quant: uplink int8 deltas)."""

    uplink: LinkConfig = F(LinkConfig(), "client -> server")
    downlink: LinkConfig = F(LinkConfig(), "server -> client")

    @model_validator(mode="after")
    def _downlink_corrects_itself(self) -> CompressConfig:
        if self.downlink.error_feedback:
            raise ValueError(
                "compress.downlink.error_feedback = true has no effect: downlink deltas are taken against each "
                "client's own decoded copy, so quantization error never accumulates; it applies to the uplink only"
            )
        return self


class PruneConfig(Section):
    """Structured pruning of the U-Net (FedPhD, Long et al. 2025), around any algorithm (``prune/``)."""

    ratio: float = F(0.0, "Torch-Pruning's pruning_ratio; 0 = no pruning. GroupNorm groups make sizes step "
                          "(`feddiff prune PRESET --ratio ...` prints them)", ge=0, lt=1)
    at: Literal["init"] | int = F(
        "init", '"init" = prune the initial global model (FedPhD\'s scripts); N = train N rounds with the '
        "sparsity regulariser, then prune the global model before round N+1"
    )
    importance: Literal["magnitude", "taylor"] = F(
        "magnitude", "channel ranking: magnitude = group L2 norm (FedPhD); taylor = |w * g| with g the last "
        "round's aggregate update (needs at >= 1)"
    )
    sparsity: float = F(1e-5, "rounds before pruning (at >= 1): weight lambda of the group-norm regulariser", ge=0)
    sparsity_norm: Literal["channel", "tensor"] = F(
        "channel", "channel = sum of each output channel's L2 norm (group lasso, the default); tensor = each "
        "weight's whole Frobenius norm (FedPhD's code)"
    )

    @field_validator("at")
    @classmethod
    def _round(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f'must be "init" or a round >= 1, got {v}')
        return v


class RobustConfig(Section):
    """Defences against faulty or poisoned client updates, around any algorithm (``algorithms/robust.py``)."""

    aggregation: Literal["mean", "median", "trimmed_mean"] = F(
        "mean", "how replies are combined: mean = the algorithm's own (weighted); median = coordinate-wise "
        "median; trimmed_mean = coordinate-wise mean without the trim share at each end (both unweighted, "
        "per edge in a hierarchy)"
    )
    trim: float = F(0.1, "trimmed_mean: share of the values dropped at each end of every coordinate", ge=0, lt=0.5)
    clip_norm: float = F(0.0, "clip each client's update (its reply minus what it was sent) to this L2 norm before "
                              "aggregation; 0 = off", ge=0)
    outlier_factor: float = F(0.0, "refuse a reply whose update norm exceeds this many times the median of its "
                                   "group's (needs 3 or more replies in the group); 0 = off", ge=0)

    @field_validator("outlier_factor")
    @classmethod
    def _above_one(cls, v: float) -> float:
        if 0 < v <= 1:
            raise ValueError(f"must be 0 (off) or above 1 (a factor of the median norm), got {v}")
        return v


class FaultsConfig(Section):
    """When a round counts: its replies after validation and screening (engines/loop.py, both engines)."""

    policy: Literal["quorum", "reject", "bounded_wait"] = F(
        "quorum", "quorum = the round counts with at least min_replies usable replies; reject = only when every "
        "selected client's reply is usable; bounded_wait = wait deadline_s at most, then count what arrived "
        "(at least min_replies)"
    )
    deadline_s: float = F(0.0, "a reply later than this many seconds after its message is that client's failure "
                               "(Flower: the message expires then; simulator: clients run one after another, so "
                               "each is timed on its own); 0 = wait", ge=0)
    stall_s: float = F(0.0, "simulator: a client that makes no training step for this many seconds is given up as "
                            "hung (one that keeps stepping, however long, is not); 0 = off", ge=0)
    min_replies: int = F(1, "quorum: usable replies a round needs to count (capped at the clients selected)", ge=1)
    retries: int = F(0, "a round that does not count asks the clients that failed again, this many times; then it "
                        "is skipped: the model is unchanged and the clients that did reply go back to their state "
                        "before the round", ge=0)

    @model_validator(mode="after")
    def _deadline_for_bounded_wait(self) -> FaultsConfig:
        if self.policy == "bounded_wait" and not self.deadline_s:
            raise ValueError('policy = "bounded_wait" needs deadline_s > 0 (how long a round waits for replies)')
        return self


class DPConfig(Section):
    """Client-level differential privacy, DP-FedAvg (``algorithms/dp.py``); off while noise_multiplier is 0."""

    noise_multiplier: float = F(0.0, "sigma: Gaussian noise of std sigma * 2 * clip_norm / (clients selected) on "
                                     "the averaged update; 0 = DP off", ge=0)
    clip_norm: float = F(0.0, "C: each client's update (reply minus what it was sent) is clipped to this L2 norm; "
                              "required when DP is on", ge=0)
    delta: float = F(1e-5, "the delta of the (epsilon, delta) guarantee the accountant reports", gt=0, lt=1)
    max_epsilon: float = F(0.0, "refuse a run whose planned rounds would spend more than this epsilon (checked "
                                "before training, and again when a resume adds rounds); 0 = no limit", ge=0)
    reproducible_noise: bool = F(False, "draw the noise from run.seed (exact resumes, tests) instead of the OS's "
                                        "entropy; such a run is marked not private")


class EMAConfig(Section):
    """Federated EMA of the weights (``algorithms/ema.py``): who keeps it; the EMA is evaluated and exported."""

    rule: Literal["off", "server", "client", "edge"] = F(
        "off", "server = the server averages the global model over rounds; client = each client carries the "
        "server's EMA through its local steps and the server averages the clients' (doubles every message); edge = "
        "hierarchies: edge EMAs synchronized at central aggregations; off = the raw model")
    decay: float = F(0.999, "EMA decay per optimizer step (a round of S local steps decays the old average by "
                            "decay^S)", gt=0, lt=1)
    warmup: bool = F(False, "decay of global step t = min(decay, (1 + t) / (10 + t)) (diffusers' EMA warm-up)")
    evaluate_raw: bool = F(False, "evaluate the raw global model too, as side model 'raw' (not exported)")


class PersonalizeConfig(Section):
    """Personalised fine-tuning after the last round (FedDM's model adaptation; ``engines/personalize.py``)."""

    steps: int = F(0, "local fine-tuning steps of the final model on each client's own data; 0 = no phase", ge=0)
    groups: list[str] = F([], "parameter groups fine-tuned (encoder, latent, decoder); empty = every parameter")
    lr: float = F(0.0, "fine-tuning learning rate; 0 = train.lr", ge=0)

    @field_validator("groups")
    @classmethod
    def _known_groups(cls, v: list[str]) -> list[str]:
        from feddiff.model.parts import GROUPS

        bad = [g for g in v if g not in GROUPS]
        if bad:
            raise ValueError(f"unknown parameter groups {bad}; choose from {list(GROUPS)}")
        return v


class AuditConfig(Section):
    """Leakage audit of the released model against each client's images (``engines/audit.py``)."""

    enabled: bool = F(False, "audit after the last round (simulator); `feddiff audit RUN_DIR` audits any run")
    num_samples: int = F(256, "generated images compared with each client's training images", ge=2)
    alpha: float = F(0.5, "near-copy criterion (Carlini et al. 2023): alpha in d1 / (alpha * mean of the n "
                          "nearest distances)", gt=0)
    neighbours: int = F(50, "near-copy criterion: n, the nearest training images the distance is normalised by "
                            "(the nearest included)", ge=2)
    threshold: float = F(1.0, "near-copy criterion: a generated image whose normalised distance is below this is a "
                              "near-copy", gt=0)
    max_train_images: int = F(0, "compare with at most this many of each client's training images (a seeded "
                                 "subset); 0 = all", ge=0)
    mia_num_images: int = F(256, "membership inference: members per client (as many label-matched held-out test "
                                 "images); 0 = skip", ge=0)
    mia_timesteps: list[int] = F([50, 100, 200], "membership inference: timesteps whose mean denoising loss is the "
                                                 "attack's score")
    strip_pairs: int = F(8, "closest generated/training pairs saved per client as an image strip", ge=0)
    features: bool = F(True, "also measure nearest-neighbour distances in the evaluation network's feature space")

    @field_validator("mia_timesteps")
    @classmethod
    def _timesteps(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 0:
            raise ValueError(f"must be a non-empty list of timesteps >= 0, got {v}")
        return v


class EvalConfig(Section):
    every_rounds: int = F(0, "evaluate every N rounds; 0 = only after the last round", ge=0)
    sampler: Literal["ddim", "ddpm"] = F("ddim", "sampler for sample grids")
    num_inference_steps: int = F(50, "sampler steps (DDPM ancestral uses T when set to 0)", ge=0)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = F(
        "trailing", "DDIM timestep spacing (trailing = FedPhD's tau, good at few steps)"
    )
    grid_size: int = F(64, "images in the sample grid PNG; 0 = no grids", ge=0)
    loss_num_samples: int = F(512, "held-out test images for the denoising loss; 0 = skip", ge=0)
    fid_num_samples: int = F(0, "generated images for FD/KID/IS per evaluated model; 0 = skip these metrics", ge=0)
    feature_net: Literal["domain", "inception"] = F(
        "domain", "features for FD/KID/IS: domain (a classifier trained offline on the dataset: 'FD-domain') "
        "or inception (the FID network; weights from a local file: 'FID')"
    )
    reference_split: Literal["train", "test"] = F("test", "real images the generated ones are compared with")
    reference_num_samples: int = F(0, "real images for the reference statistics; 0 = the whole split", ge=0)
    federated_reference: bool = F(
        False, "reference statistics summed from each client's own train images (only feature sums leave "
        "a client; FD only, no KID) instead of the reference split"
    )
    inception_weights: str = F(
        "", "path to pt_inception-2015-12-05-6726825d.pth; empty = $FEDDIFF_INCEPTION_WEIGHTS"
    )
    cache_dir: str = F(
        "", "cache for feature networks and reference statistics; empty = $FEDDIFF_CACHE or ~/.cache/feddiff"
    )


class SweepConfig(Section):
    """A grid of runs for ``feddiff sweep`` (``feddiff run`` trains the base point only)."""

    grid: dict[str, list[Any]] = F({}, "dotted key -> values; the sweep runs every combination, in file order")
    variants: dict[str, list[str]] = F(
        {}, "name -> overrides (\"section.key=value\") applied together; every grid point runs each variant"
    )
    repeats: int = F(
        1, "runs per grid point, seeds run.seed, run.seed + 1, ...; the data split stays fixed (an unset "
        "partition.seed becomes the base run.seed)", ge=1
    )


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    algorithm: SerializeAsAny[AlgorithmConfig] = F(None, "the algorithm section (validated by the registered class)",
                                                   validate_default=True)
    compress: CompressConfig = CompressConfig()
    prune: PruneConfig = PruneConfig()
    robust: RobustConfig = RobustConfig()
    faults: FaultsConfig = FaultsConfig()
    dp: DPConfig = DPConfig()
    ema: EMAConfig = EMAConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()
    audit: AuditConfig = AuditConfig()
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig = SweepConfig()

    @field_validator("algorithm", mode="before")
    @classmethod
    def _registered_algorithm(cls, raw: Any) -> Any:
        # the registered class of algorithm.name validates the section (no name: the default, fedavg)
        if raw is None:
            raw = {}
        known = algorithm_configs()
        if isinstance(raw, AlgorithmConfig):
            if known.get(raw.name) is not type(raw):  # e.g. the base class named "fedprox": no mu
                raise ValueError(f"a {type(raw).__name__} is not the section of algorithm {raw.name!r}; "
                                 f"expected {getattr(known.get(raw.name), '__name__', 'a registered algorithm')}")
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"must be a table of algorithm settings, got {raw!r}")
        name = raw.get("name", "fedavg")
        if not isinstance(name, str) or name not in known:
            raise ValueError(f"unknown algorithm {name!r} (algorithm.name); choose from {sorted(known)}")
        return known[name].model_validate(raw)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        t = self.train
        if t.optimizer == "adam" and t.momentum != 0:
            raise ValueError(f"train.momentum = {t.momentum} applies to optimizer = \"sgd\" only (Adam's are "
                             "train.adam_betas)")
        if t.optimizer == "sgd" and list(t.adam_betas) != [0.9, 0.999]:
            raise ValueError(f"train.adam_betas = {list(t.adam_betas)} applies to optimizer = \"adam\" only "
                             "(SGD's is train.momentum)")
        if self.diffusion.beta_start >= self.diffusion.beta_end:
            raise ValueError(
                f"diffusion.beta_start ({self.diffusion.beta_start}) must be below "
                f"diffusion.beta_end ({self.diffusion.beta_end})"
            )
        p = self.prune
        if p.ratio > 0 and isinstance(p.at, int):
            from feddiff.algorithms import get_algorithm

            if get_algorithm(self.algorithm.name).strategy.personalized:
                raise ValueError(f"prune.at = {p.at} with {self.algorithm.name!r}: the server never holds the clients' "
                                 "personal parts as trained, so it cannot rank their channels; prune at init "
                                 '(prune.at = "init")')
            stale = self.algorithm.global_fresh_after(p.at)
            if stale is not None:
                raise ValueError(f"prune.at = {p.at}: {stale}")
        if p.ratio > 0 and p.importance == "taylor" and p.at == "init":
            raise ValueError('prune.importance = "taylor" ranks channels by a training update: it needs '
                             'prune.at >= 1 (use "magnitude" to prune at init)')
        if self.algorithm.min_clients > self.partition.num_clients:
            raise ValueError(
                f"algorithm.min_clients ({self.algorithm.min_clients}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        from feddiff.algorithms.dp import check  # fails closed before any training: clip, algorithm, budget

        check(self)
        from feddiff.algorithms.ema import check as check_ema

        check_ema(self, advise=True)
        pz = self.personalize
        if not pz.steps and (pz.groups or pz.lr):
            raise ValueError(f"personalize.{'groups' if pz.groups else 'lr'} is set but personalize.steps = 0, which "
                             "turns the phase off; set personalize.steps > 0")
        late = [t for t in self.audit.mia_timesteps if t >= self.diffusion.num_train_timesteps]
        if late:
            raise ValueError(f"audit.mia_timesteps {late} are not below diffusion.num_train_timesteps = "
                             f"{self.diffusion.num_train_timesteps}")
        return self


# ----------------------------------------------------------------------------------------------
# Loading, overrides, errors


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (the value read as a TOML literal, else kept as a string), or
    ``section={...}``: an inline TOML table that replaces the whole section (e.g. another algorithm's)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if len(path) < 2 and not (len(path) == 1 and isinstance(value, dict)):
        raise ConfigError(f"override key {key!r} must name a section and a key, e.g. train.lr=1e-3 (or a whole "
                          "section as an inline table, e.g. algorithm={name=\"fedavg\", fraction=0.4})")
    return path, value


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, making sections as needed."""
    node = tree
    for p in path[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {p!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], allowed: tuple[str, ...] | None = None, where: str = "here",
) -> dict[str, Any]:
    """A copy of the tables ``raw`` with each ``section.key=value`` of ``overrides`` set.

    Parameters
    ----------
    allowed
        When given, the only keys that may be set: exact dotted keys, or prefixes ending in ``.``.
    where
        When an override outside ``allowed`` cannot change (and why), for the error message.
    """
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        dotted = ".".join(key)
        if allowed is not None and not any(dotted == k or (k.endswith(".") and dotted.startswith(k)) for k in allowed):
            raise ConfigError(f"--set {dotted} cannot change {where}; allowed: {', '.join(allowed)}")
        set_path(raw, key, value)
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section; see `feddiff config`)"
        got = e.get("input")
        # a section's or the whole config's own rule names its keys itself: no dump of the tables
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        if loc == "algorithm" and msg.startswith("unknown algorithm"):  # the message names the value already
            loc, shown, msg = "algorithm.name", "", msg.replace(" (algorithm.name)", "")
        lines.append(f"  {loc or 'config'}: {msg}{shown}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested dict (missing keys take their defaults)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's tables, unvalidated; ``run.name`` defaults to the file's stem.

    A ``.json`` file is read as a run folder's ``config.json`` (the resolved config of a run).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.suffix == ".json":  # a run folder's resolved config.json: the same run, started again
        try:
            raw = json.loads(p.read_text())
        except ValueError as err:
            raise ConfigError(f"{p}: not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a JSON config must be an object of sections, got {type(raw).__name__}")
        return raw
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from None
    if not raw:
        d = Config()
        warnings.warn(f"{p} sets nothing, so every setting takes its default: {d.data.dataset} "
                      f"({'all train images' if not d.data.max_train_samples else d.data.max_train_samples}), "
                      f"{d.partition.method} split over {d.partition.num_clients} clients, {d.algorithm.name}, "
                      f"the {d.model.preset} U-Net, {d.run.num_rounds} rounds. `feddiff config` lists the "
                      "defaults; configs/smoke.toml is a run of seconds", UserWarning, stacklevel=2)
    if not raw.get("run", {}).get("name"):
        raw.setdefault("run", {})["name"] = p.stem
    return raw


def config_from_tables(raw: dict[str, Any], overrides: list[str] = (), source: str = "defaults") -> Config:
    """Validate tables (from ``read_toml``, or saved) after applying ``section.key=value`` overrides."""
    raw = apply_overrides(raw, overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return config_from_dict(raw, source)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or only defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    if path is None:
        return config_from_tables({}, overrides)
    return config_from_tables(read_toml(path), overrides, str(path))


def load_resolved(path: str | Path) -> Config:
    """Read back the ``config.json`` a run saved."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the saved config {p}: {err}") from None
    return config_from_dict(raw, str(p))


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) rows for every field, for ``feddiff config``."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if model is Config and name == "algorithm":  # one section, many registered classes: list them all
            configs = algorithm_configs()
            rows.append((f"{key}.name", '"fedavg"', "algorithm: " + " | ".join(configs)))
            rows += [r for r in describe(AlgorithmConfig, key + ".") if not r[0].endswith(".name")]
            for tag, variant in configs.items():
                own = set(variant.model_fields) - set(AlgorithmConfig.model_fields)
                rows += [(k, d, f"[{tag}] {doc}") for k, d, doc in describe(variant, key + ".")
                         if k.rsplit(".", 1)[1] in own]
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe(ann, key + ".")
        else:
            rows.append((key, json.dumps(field.default), field.description or ""))
    return rows

