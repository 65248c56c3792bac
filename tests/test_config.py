import json
import os

import pytest
import torch

from feddiff.config import Config, ConfigError, describe, load_config, load_resolved, parse_override


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_file_name_as_run_name(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nlr = 1e-3\n"))
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 32 and cfg.run.name == "c"
    assert cfg.algorithm.name == "fedavg"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(write(tmp_path, "[train]\nlearning_rate = 1e-3\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):
        load_config(write(tmp_path, "[trainer]\nlr = 1\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*integer.*got 'big'"):
        load_config(write(tmp_path, '[train]\nbatch_size = "big"\n'))
    with pytest.raises(ConfigError, match=r"run\.num_rounds: .*greater than or equal to 1.*got 0"):
        load_config(None, ["run.num_rounds=0"])


def test_unknown_names_list_choices():
    with pytest.raises(ConfigError, match=r"model\.preset: .*unknown preset 'huge'; choose from \["):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(ConfigError, match=r"data\.dataset: .*unknown dataset 'mnist'; choose from \[.*'fashion-mnist'"):
        load_config(None, ["data.dataset=mnist"])
    with pytest.raises(ConfigError, match=r"partition\.method: Input should be 'iid', 'dirichlet'"):
        load_config(None, ["partition.method=shards"])


def test_overrides_parse_toml_values():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("data.dataset=cifar10") == (["data", "dataset"], "cifar10")
    assert parse_override("model.block_out_channels=[8, 16]") == (["model", "block_out_channels"], [8, 16])
    assert parse_override("train.keep_optimizer_state=true")[1] is True
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("lr")
    cfg = load_config(None, ["train.lr=0.5", "partition.num_clients=7"])
    assert cfg.train.lr == 0.5 and cfg.partition.num_clients == 7


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"beta_start \(0.03\) must be below diffusion.beta_end \(0.02\)"):
        load_config(None, ["diffusion.beta_start=0.03"])
    with pytest.raises(ConfigError, match=r"min_clients \(9\) exceeds partition.num_clients \(5\)"):
        load_config(None, ["algorithm.min_clients=9"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))


def test_resolved_roundtrip(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "train.adam_betas=[0.9, 0.99]"])
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert load_resolved(p) == cfg


def test_every_field_documented():
    rows = describe(Config)
    assert len(rows) > 40
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]
    assert ("train.lr", "0.0002", "learning rate of the local optimizer") in rows


def test_shipped_configs_load():
    from pathlib import Path

    from feddiff.sweep import plan

    for p in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml")):
        cfg = load_config(p)
        if cfg.sweep.grid or cfg.sweep.variants:  # every point of a shipped sweep is a valid config too
            plan(p)


def test_device_choice_and_cuda_determinism(monkeypatch):
    from feddiff.engines.experiment import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="run.device='cuda' but no CUDA device is available"):
        pick_device("cuda")
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        assert pick_device("auto", deterministic=False).type == "cuda" and torch.backends.cudnn.benchmark
        assert pick_device("auto").type == "cuda"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_downlink_error_feedback_is_refused():
    with pytest.raises(ConfigError, match=r"compress.downlink.error_feedback = true has no effect"):
        load_config(None, ["compress.downlink.mode=delta", "compress.downlink.codec=int8",
                           "compress.downlink.error_feedback=true"])
    cfg = load_config(None, ["compress.uplink.mode=delta", "compress.uplink.codec=int8",
                             "compress.uplink.error_feedback=true"])
    assert cfg.compress.uplink.error_feedback


def test_partition_seed_defaults_to_the_run_seed_and_is_strict(tmp_path):
    assert Config().partition.seed is None  # None: the data split derives from run.seed
    cfg = load_config(None, ["partition.seed=11", "run.seed=4"])
    assert cfg.partition.seed == 11 and cfg.run.seed == 4
    assert load_config(write(tmp_path, "[partition]\nseed = 2\n")).partition.seed == 2
    with pytest.raises(ConfigError, match=r"partition\.seed: Input should be a valid integer"):
        load_config(None, ['partition.seed="2"'])
    for c in (Config(), cfg):  # config.json holds null or the number, and reads back the same
        p = tmp_path / "config.json"
        p.write_text(json.dumps(c.model_dump(mode="json")))
        assert load_resolved(p) == c
    assert ("partition.seed", "null") in [(k, d) for k, d, _ in describe(Config)]


def test_config_lists_every_algorithms_own_fields():
    # SerializeAsAny hides the annotation behind AlgorithmConfig: the algorithm rows must still appear
    rows = {k: d for k, _, d in describe(Config)}
    assert rows["algorithm.mu"].startswith("[fedprox]") and "fedprox" in rows["algorithm.name"]


def test_algorithm_section_errors_are_config_errors():
    from feddiff.config import AlgorithmConfig

    with pytest.raises(ConfigError, match="algorithm"):
        load_config(None, ["algorithm.name=[1]"])
    with pytest.raises(Exception, match="fedprox"):
        Config(algorithm=AlgorithmConfig(name="fedprox"))  # the base class is not FedProx's section


def test_optimizer_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ConfigError, match="train.momentum"):
        load_config(None, ["train.momentum=0.9"])  # adam has no momentum setting
    with pytest.raises(ConfigError, match="adam_betas"):
        load_config(None, ['train.optimizer="sgd"', "train.adam_betas=[0.5, 0.9]"])
    assert load_config(None, ['train.optimizer="sgd"', "train.momentum=0.9"]).train.momentum == 0.9


def test_a_whole_section_can_be_replaced_by_an_inline_table():
    # sweeps compare algorithms whose sections have different fields: a variant replaces the table
    cfg = load_config(None, ['algorithm={name="fedprox", mu=0.5}'])
    assert cfg.algorithm.name == "fedprox" and cfg.algorithm.mu == 0.5
    with pytest.raises(ConfigError, match="inline table"):
        load_config(None, ["algorithm=3"])


def test_unknown_algorithm_is_one_clear_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ['algorithm.name="nope"'])
    lines = str(err.value).splitlines()
    assert lines[1].startswith("  algorithm.name: unknown algorithm 'nope'; choose from [") and "fedphd" in lines[1]
    assert "Value error" not in str(err.value)
