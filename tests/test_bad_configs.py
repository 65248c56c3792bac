"""Property-based: any bad value in any config key, or an unknown key, fails as one clear ConfigError.

Generated configs are the tiny test config with one key set to an arbitrary value (wrong types,
out-of-range numbers, NaN and infinities, lists, tables, empty strings). Each must either validate or
raise :class:`ConfigError` naming that key; nothing else may escape (no TypeError, no traceback
from pydantic internals). Configs that validate and change the data split go on to load the data
and partition it, where a bad combination (more clients than samples, a shard rule that cannot be
met) must be a PartitionError or DatasetError with a message, never an error from numpy or torch.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feddiff.config import Config, ConfigError, config_from_dict, describe
from feddiff.data.partition import PartitionError
from feddiff.data.sources import DatasetError
from tests.conftest import tiny_config

KEYS = [key for key, _, _ in describe(Config) if not key.startswith(("sweep.", "algorithm."))] + [
    "algorithm.name", "algorithm.fraction", "algorithm.mu", "algorithm.num_edges", "algorithm.central_every",
]
SECTIONS = sorted({k.split(".")[0] for k in KEYS})

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([0, -1, 1, 2, 0.5, 1.5, -0.5, 1e-30, 1e30, "", "iid", "int8", "fedavg", "auto"]),
)


def base(fmnist_dir, tmp_path) -> dict:
    return tiny_config(fmnist_dir, tmp_path).model_dump(mode="json")


def set_key(raw: dict, key: str, value) -> dict:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return raw


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(key=st.sampled_from(KEYS), value=ANY_VALUE)
def test_any_value_in_any_key_validates_or_is_one_clear_error(fmnist_dir, tmp_path, key, value):
    raw = set_key(base(fmnist_dir, tmp_path), key, value)
    try:
        config_from_dict(raw, "generated")
    except ConfigError as err:
        text = str(err)
        assert text.startswith("invalid configuration (generated)"), text
        named = re.findall(r"^  ([\w.]+):", text, flags=re.M)
        assert named, text
        # the key set, or (for a rule across keys) its section or the config, naming the key in its text
        assert any(n == key or key.startswith(n + ".") or n.startswith(key.split(".")[0])
                   or (n == "config" and key in text) for n in named), (key, text)
        assert "{'run':" not in text  # never a dump of the whole config
        assert "Traceback" not in text and len(text) < 2000


@FAST
@given(section=st.sampled_from(SECTIONS), name=st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
def test_an_unknown_key_is_named(fmnist_dir, tmp_path, section, name):
    known = {k.split(".", 1)[1] for k in KEYS if k.startswith(section + ".")}
    if name in known or section == "algorithm":
        return  # algorithm's keys depend on the algorithm; its unknown keys are tested in test_config
    raw = set_key(base(fmnist_dir, tmp_path), f"{section}.{name}", 1)
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: unknown key"):
        config_from_dict(raw, "generated")


PARTITION = st.fixed_dictionaries({
    "method": st.sampled_from(["iid", "dirichlet", "pathological", "quantity"]),
    "num_clients": st.integers(1, 600),
    "alpha": st.floats(1e-3, 1e3),
    "classes_per_client": st.integers(1, 12),
    "min_samples": st.integers(0, 300),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=PARTITION, max_train=st.sampled_from([0, 1, 7, 50, 399]))
def test_valid_configs_partition_or_fail_with_a_message(fmnist_dir, tmp_path, part, max_train):
    from feddiff.engines.experiment import load_split, partition_train

    raw = base(fmnist_dir, tmp_path)
    raw["partition"].update(part)
    raw["data"]["max_train_samples"] = max_train
    try:
        cfg = config_from_dict(raw, "generated")
    except ConfigError:
        return  # covered above
    train = load_split(cfg, "train")
    try:
        _, parts = partition_train(cfg, train.labels.numpy())
    except (PartitionError, DatasetError) as err:
        assert str(err) and "Traceback" not in str(err)
        return
    sizes = [len(p) for p in parts]
    assert len(parts) == part["num_clients"] and sum(sizes) <= len(train.labels)
    assert min(sizes) >= min(part["min_samples"], 1) or part["method"] == "pathological"
    assert not any(math.isnan(s) for s in sizes)
