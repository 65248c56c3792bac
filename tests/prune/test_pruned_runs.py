"""Pruning in runs: every algorithm, smaller messages, client records pruned alike, exact resume, sparsity."""

import pytest
import torch

from feddiff.config import ConfigError, config_from_dict
from feddiff.engines.runner import resume, run
from feddiff.model.spec import ModelSpec, build_model
from feddiff.prune.wrapper import SparsityTerm
from feddiff.types import under

from tests.engines.test_simulator import final_weights

QUIET = {"grid_size": 0, "loss_num_samples": 0}
HIER = {"fraction": 0.5, "central_every": 2, "central_a": 500.0}
ALGORITHMS = {
    "fedavg": {}, "fedprox": {"mu": 0.1}, "scaffold": {}, "usplit": {}, "udec": {"fraction": 0.5}, "ulatdec": {},
    "hierfavg": HIER, "fedphd": HIER,
}


def pruned_config(make_config, name="fedavg", at=1, rounds=3, ratio=0.5, **sections):
    raw = {"run": {"num_rounds": rounds}, "algorithm": {"name": name, **ALGORITHMS[name]}, "eval": QUIET,
           "prune": {"ratio": ratio, "at": at, "sparsity": 1e-3}}
    if name in ("hierfavg", "fedphd"):
        raw["partition"] = {"num_clients": 4, "method": "pathological", "classes_per_client": 2}
    if name == "scaffold":
        raw["train"] = {"optimizer": "sgd", "lr": 0.05}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return make_config(**raw)


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# personal-model algorithms prune at init; a hierarchy after a central round (every 2 here)
AT = {"udec": "init", "ulatdec": "init", "hierfavg": 2, "fedphd": 2}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_on_after_pruning(make_config, name):
    at = AT.get(name, 1)
    rd = run(pruned_config(make_config, name, at=at))
    m = rd.read_metrics()
    assert not any("rejected" in r for r in m)
    pruned = m[0 if at == "init" else at]
    assert pruned["pruned"]["parameters_after"] < pruned["pruned"]["parameters_before"]
    assert pruned["model_cost"]["parameters"] == pruned["pruned"]["parameters_after"]
    w = under(final_weights(rd), "strategy/global/")
    assert w["conv_in.weight"].shape[0] == 8  # tiny: 16 channels, group size 2 -> 1 at ratio 0.5
    # every record has the shapes of the architecture it holds: the server's and each reached client's are
    # pruned; a client not reached since the pruning (fraction < 1) keeps the dense model it holds
    _, tensors, state = rd.latest_checkpoint()
    pruned_shapes = shapes(w)
    dense_shapes = shapes(build_model(ModelSpec(ModelSpec.from_json(state["strategy"]["spec"]).unet)).state_dict())
    reached = {k for k, meta in state["clients"].items() if meta.get("spec") == state["strategy"]["spec"]}
    assert reached == {k for k in state["clients"] if k.isdigit()} or ALGORITHMS[name].get("fraction", 1) < 1
    for key, v in tensors.items():
        name_ = next((p for p in key.split("/") if p in pruned_shapes), None)
        if name_ is not None and v.dim() > 0 and v.numel() > 1:
            held = key.split("/")[1] in reached if key.startswith("client/") else True
            assert tuple(v.shape) == (pruned_shapes if held else dense_shapes)[name_], key


def test_messages_shrink_after_pruning_and_the_spec_travels_once(make_config):
    dense = run(make_config(run={"num_rounds": 3}, eval=QUIET))
    rd = run(pruned_config(make_config, at=1))
    d, p = dense.read_metrics(), rd.read_metrics()
    # round 1: dense weights, and the sparsity settings in the task's header
    assert 0 < p[0]["clients"][0]["bytes_down"] - d[0]["clients"][0]["bytes_down"] < 100
    params = p[1]["pruned"]
    share = params["parameters_after"] / params["parameters_before"]
    for r in (1, 2):
        for c in (0, 1):
            assert p[r]["clients"][c]["bytes_up"] == pytest.approx(share * d[r]["clients"][c]["bytes_up"], rel=0.1)
    # the first pruned message also carries the spec (the pruning history): later ones do not
    extra = p[1]["clients"][0]["bytes_down"] - p[2]["clients"][0]["bytes_down"]
    assert 500 < extra < 20_000
    assert p[0]["clients"][0]["sparsity_reg"] > 0 and "sparsity_reg" not in p[1]["clients"][0]


@pytest.mark.parametrize("at", ["init", 2])
def test_pruning_at_init_and_after_sparse_training(make_config, at):
    rd = run(pruned_config(make_config, at=at))
    m = rd.read_metrics()
    when = 1 if at == "init" else 3
    assert [r["round"] for r in m if "pruned" in r] == [when]
    assert all("sparsity_reg" in c for r in m[: when - 1] for c in r["clients"])


@pytest.mark.filterwarnings("ignore:prune.at")
@pytest.mark.parametrize("stop", [2, 3])  # killed just before the pruning (it prunes before round 3), and after it
@pytest.mark.parametrize("name, extra", [
    ("scaffold", {"compress": {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True}},
                  "algorithm": {"fraction": 0.5}}),  # half the clients: some are reached only after pruning
    ("udec", {"prune": {"at": "init"}}),  # personal models: prune at init (the server never sees them trained)
    ("fedphd", {"compress": {"downlink": {"codec": "fp16"}}, "algorithm": {"central_every": 2}}),
    ("fedavg", {"prune": {"importance": "taylor"}, "train": {"keep_optimizer_state": True}}),
])
def test_resume_before_or_after_pruning_ends_bit_identical(make_config, name, extra, stop):
    kw = {"model": {"dropout": 0.1}, **extra}
    full = run(pruned_config(make_config, name, at=2, rounds=4, **kw))
    part = run(pruned_config(make_config, name, at=2, rounds=stop, **kw))
    resume(part.path, ["run.num_rounds=4"])
    a, b = final_weights(full), final_weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = full.latest_checkpoint()[1], part.latest_checkpoint()[1]
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)  # every record, every client
    assert [r.get("pruned") for r in full.read_metrics()] == [r.get("pruned") for r in part.read_metrics()]


def test_scaffold_controls_and_ef_residuals_are_pruned_not_reset(make_config):
    link = {"uplink": {"codec": "int8", "mode": "delta", "error_feedback": True}}
    rd = run(pruned_config(make_config, "scaffold", at=1, rounds=2, compress=link))  # keeps 2 checkpoints
    before, after = (rd.load_checkpoint(p)[1] for _, p in sorted(rd.checkpoints()))
    spec = ModelSpec.from_json(rd.latest_checkpoint()[2]["strategy"]["spec"])
    from feddiff.prune.structure import index_maps
    maps = index_maps(ModelSpec(spec.unet), spec)
    (old, dims) = maps["conv_in.weight"]
    kept = dims[0]
    # the server's control variate after round 2 started from round 1's, pruned: c_2 = c_1[kept] + mean(dc)
    key = "strategy/control/conv_in.weight"
    assert before[key].shape[0] == old[0] and after[key].shape[0] == len(kept)
    ef = [k for k in after if k.startswith("client/0/tensors/ef/")]
    assert ef and all(after[k].shape == after[k.replace("client/0/tensors/ef/", "strategy/global/")].shape
                      for k in ef if k.replace("client/0/tensors/ef/", "strategy/global/") in after)


def test_shared_optimizer_restarts_with_the_new_architecture(make_config):
    rd = run(pruned_config(make_config, at=1, train={"optimizer_scope": "shared"}))
    assert not any("rejected" in r for r in rd.read_metrics())


def test_sparsity_term_adds_the_exact_gradient_of_the_group_norms():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    out = torch.nn.Conv2d(4, 2, 1)
    names, params = ["enc.weight", "enc.bias", "conv_out.weight"], [conv.weight, conv.bias, out.weight]
    for norm in ("channel", "tensor"):
        w = conv.weight.detach().clone().requires_grad_()
        o = out.weight.detach().clone().requires_grad_()
        if norm == "channel":  # sum of each output channel's L2 norm; conv_out is never pruned: excluded
            reg = w.reshape(4, -1).norm(dim=1).sum()
        else:  # FedPhD's code: torch.norm(W.view(out, -1)) of every weight, conv_out included
            reg = w.reshape(4, -1).norm() + o.reshape(2, -1).norm()
        (0.5 * reg).backward()
        for p in params:
            p.grad = torch.zeros_like(p)
        term = SparsityTerm(0.5, norm)
        term.start(names, params)
        term.grad()
        assert torch.allclose(conv.weight.grad, w.grad, atol=1e-6)
        assert torch.equal(conv.bias.grad, torch.zeros_like(conv.bias))
        assert torch.allclose(out.weight.grad, o.grad if o.grad is not None else torch.zeros_like(o), atol=1e-6)
        assert term.metrics()["sparsity_reg"] == pytest.approx(float(reg.detach()), rel=1e-5)


def test_prune_settings_are_checked(make_config):
    base = {"run": {"num_rounds": 3}}
    with pytest.raises(ConfigError, match="never holds the clients' personal parts"):
        config_from_dict({**base, "algorithm": {"name": "udec"}, "prune": {"ratio": 0.2, "at": 1}})
    config_from_dict({**base, "algorithm": {"name": "udec"}, "prune": {"ratio": 0.2}})  # at init: fine
    hier = {"name": "fedphd", "central_every": 5}
    with pytest.raises(ConfigError, match=r"round 7 does not update; prune after a central round \(multiples of k"):
        config_from_dict({**base, "algorithm": hier, "prune": {"ratio": 0.2, "at": 7}})
    config_from_dict({**base, "algorithm": hier, "prune": {"ratio": 0.2, "at": 10}})
    code = {**hier, "central_schedule": "code"}  # central at 0-based rounds 0, 5: after 1-based rounds 1, 6, 11
    config_from_dict({**base, "algorithm": code, "prune": {"ratio": 0.2, "at": 6}})
    with pytest.raises(ConfigError, match="rounds 1, 1 \\+ k"):
        config_from_dict({**base, "algorithm": code, "prune": {"ratio": 0.2, "at": 5}})
    with pytest.warns(UserWarning, match="never prune it"):
        run(make_config(run={"num_rounds": 1}, eval=QUIET, prune={"ratio": 0.5, "at": 1}))
    with pytest.raises(ValueError, match="needs prune.at >= 1"):
        config_from_dict({**base, "prune": {"ratio": 0.2, "importance": "taylor"}})
    with pytest.raises((ValueError, ConfigError), match="round >= 1"):
        config_from_dict({**base, "prune": {"ratio": 0.2, "at": 0}})
    with pytest.raises((ValueError, ConfigError), match="ratio"):
        config_from_dict({**base, "prune": {"ratio": 1.0}})


def test_taylor_importance_in_a_run(make_config):
    rd = run(pruned_config(make_config, at=1, prune={"ratio": 0.5, "at": 1, "importance": "taylor"}))
    assert rd.read_metrics()[1]["pruned"]["importance"] == "taylor"


def test_taylor_without_an_update_prunes_by_magnitude_and_reports_it_late(make_config, monkeypatch):
    from feddiff.client.runtime import ClientRuntime

    handle = ClientRuntime.handle

    def fail_rounds_1_2(self, task, *args, **kwargs):  # 0-based rounds 1 and 2 get no usable reply
        if task.config["round"] in (1, 2):
            raise RuntimeError("offline")
        return handle(self, task, *args, **kwargs)

    monkeypatch.setattr(ClientRuntime, "handle", fail_rounds_1_2)
    cfg = pruned_config(make_config, at=2, rounds=4, prune={"importance": "taylor"})
    with pytest.warns(UserWarning, match="pruning by magnitude"):
        rd = run(cfg)
    m = rd.read_metrics()
    assert [r["round"] for r in m if "skipped" in r] == [2, 3]
    # pruned before round 3, which had no reply: a round that does not count undoes what its configure
    # did, so the pruning that stands is the one before round 4 (where it is reported)
    assert [(r["round"], r["pruned"]["round"], r["pruned"]["importance"]) for r in m if "pruned" in r] == \
        [(4, 4, "magnitude")]


def test_a_spec_that_does_not_extend_the_clients_is_refused():
    from feddiff.client.node import ClientNode
    from feddiff.client.runtime import ClientRuntime, ClientState
    from feddiff.compress.link import ClientLink, LinkSpecs
    from feddiff.model.presets import unet_kwargs

    base = ModelSpec(unet_kwargs("tiny", 1, 8))
    other = ModelSpec(unet_kwargs("tiny", 1, 8, block_out_channels=[32, 64]))
    node = ClientNode(ClientRuntime(lambda spec: None, base, None, None, 0), ClientLink(LinkSpecs(), 0))
    state = ClientState(tensors={"scaffold/conv_in.weight": torch.zeros(16, 1, 3, 3)})
    with pytest.raises(ValueError, match="cannot replace this client's"):
        node._new_architecture(state, other)
    assert state.tensors["scaffold/conv_in.weight"].shape == (16, 1, 3, 3)
