"""[ema]: the decay per optimizer step, the three rules by hand, what is evaluated, exported and resumed."""

import math

import pytest
import torch

from feddiff.algorithms import Reply, Transfer, strategy_from
from feddiff.algorithms.ema import EMAClient, EMAStrategy, combined_decay, decay_at
from feddiff.algorithms.fedavg import FedAvgConfig
from feddiff.algorithms.hierarchical import HierFAVGConfig
from feddiff.algorithms.unet_split import UDecConfig
from feddiff.client.runtime import ClientState
from feddiff.client.train import LocalTrainSpec
from feddiff.config import ConfigError, EMAConfig
from feddiff.engines.runner import resume, run
from feddiff.types import under


def test_the_decay_is_per_optimizer_step():
    assert combined_decay(0, 3, 0.9, False) == pytest.approx(0.729)
    assert combined_decay(5, 0, 0.9, False) == 1.0
    # warm-up: min(0.9, (1 + t) / (10 + t)) for t = 0, 1, 2: 1/10 * 2/11 * 3/12
    assert combined_decay(0, 3, 0.9, True) == pytest.approx(0.1 * 2 / 11 * 3 / 12)
    assert decay_at(1000, 0.9, True) == 0.9  # (1001 / 1010) > 0.9
    # a fractional mean of steps: 2.5 steps of 0.5 per step
    assert combined_decay(0, 2.5, 0.5, False) == pytest.approx(0.5 ** 2.5)
    # past the warm-up every step decays by `decay`: the closed form equals the product step by step
    assert combined_decay(3, 2000, 0.99, True) == pytest.approx(math.prod(decay_at(3 + i, 0.99, True)
                                                                          for i in range(2000)), rel=1e-9)


def wrapped(inner_cfg, rule, n=2, decay=0.5, steps=2, **ema):
    # the server knows each client's steps from the config (2 local steps), never from its reply
    s = EMAStrategy(strategy_from(inner_cfg, n, 0), EMAConfig(rule=rule, decay=decay, **ema),
                    LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=steps))
    s.initialize({"w": torch.zeros(2)})
    return s


def test_server_rule_by_hand():
    s = wrapped(FedAvgConfig(), "server")
    s.configure(0)
    # a client claiming 1e9 steps changes nothing: the server counts the configured 2
    s.aggregate(0, [Reply(0, {"w": torch.tensor([1.0, 1.0])}, 1, {"steps": 1e9}),
                    Reply(1, {"w": torch.tensor([3.0, 3.0])}, 3, {"steps": math.nan})])
    assert s.exchange(0, []) == []  # the round's end: the EMA of its result
    # global = (1 + 9) / 4 = 2.5; keep = 0.5^2 = 0.25; ema = 0.25 * 0 + 0.75 * 2.5
    assert torch.allclose(s.inner.global_model["w"], torch.tensor([2.5, 2.5]))
    assert torch.allclose(s.global_state()["w"], torch.tensor([1.875, 1.875]))
    assert s.round_metrics(0)["ema"] == {"rule": "server", "step": 2, "keep": 0.25}


def test_server_rule_follows_a_hierarchys_central_model_in_the_same_round():
    cfg = HierFAVGConfig(num_edges=2, central_every=1, selection="fixed", edge_of=[0, 1])
    s = wrapped(cfg, "server")
    s.configure(0)
    s.aggregate(0, [Reply(0, {"w": torch.full((2,), 2.0)}, 1, {}), Reply(1, {"w": torch.full((2,), 4.0)}, 3, {})])
    arrived = []
    while transfers := s.exchange(0, arrived):
        arrived = transfers
    # the central model 3.5 is what the EMA moves to, in this round: 0.25 * 0 + 0.75 * 3.5
    assert torch.allclose(s.inner.global_model["w"], torch.full((2,), 3.5))
    assert torch.allclose(s.global_state()["w"], torch.full((2,), 2.625))


def test_client_rule_carries_the_ema_through_local_steps_and_averages_it():
    s = wrapped(FedAvgConfig(), "client")
    tasks = s.configure(0)
    assert tasks[0].config["ema_step"] == 0 and torch.equal(tasks[0].extras["ema/w"], torch.zeros(2))
    # the client half: two optimizer steps moving the weights to 1 then 2
    hook, state = EMAClient(None), ClientState()
    (term,) = hook.terms(tasks[0], state)
    p = torch.nn.Parameter(torch.zeros(2))
    term.start(["w"], [p])
    for value in (1.0, 2.0):
        p.data.fill_(value)
        term.after_step()
    extras = hook.reply_extras(tasks[0], state, {"w": p.data}, None)
    # 0.5 * 0 + 0.5 * 1 = 0.5; 0.5 * 0.5 + 0.5 * 2 = 1.25; nothing of it stays in the client's record
    assert torch.allclose(extras["ema/w"], torch.tensor([1.25, 1.25])) and not state.tensors
    s.aggregate(0, [Reply(0, {"w": torch.full((2,), 2.0)}, 1, {"steps": 2.0}, extras),
                    Reply(1, {"w": torch.full((2,), 4.0)}, 3, {"steps": 2.0}, {"ema/w": torch.full((2,), 2.25)})])
    # the clients' EMAs, sample-weighted: (1.25 + 3 * 2.25) / 4 = 2.0; the model: (2 + 12) / 4 = 3.5
    assert torch.allclose(s.global_state()["w"], torch.full((2,), 2.0))
    assert torch.allclose(s.inner.global_model["w"], torch.full((2,), 3.5))
    assert s.ema_step == 2 and s.configure(1)[0].config["ema_step"] == 2
    # a reply's EMA is checked even around an algorithm that declares no extras (a missing one is refused)
    assert set(s.expected_extras(tasks[0])) == {"ema/w"}
    # around an algorithm that declares its extras, a reply must carry both its and the EMA
    from feddiff.algorithms.scaffold import ScaffoldConfig

    sc = wrapped(ScaffoldConfig(), "client")
    assert set(sc.expected_extras(sc.configure(0)[0])) == {"dc/w", "ema/w"}


def test_edge_rule_synchronizes_edge_emas_at_central_aggregations():
    cfg = HierFAVGConfig(num_edges=2, central_every=1, selection="fixed", edge_of=[0, 1])
    s = wrapped(cfg, "edge", steps=1)
    s.configure(0)
    s.aggregate(0, [Reply(0, {"w": torch.full((2,), 2.0)}, 1, {"steps": 1.0}),
                    Reply(1, {"w": torch.full((2,), 4.0)}, 3, {"steps": 1.0})])
    assert torch.allclose(s.edge_ema[0]["w"], torch.full((2,), 1.0))  # 0.5 * 0 + 0.5 * 2
    assert torch.allclose(s.edge_ema[1]["w"], torch.full((2,), 2.0))
    up = s.exchange(0, [])
    assert [(t.src, bool(t.meta.get("ema"))) for t in up] == [("edge0", False), ("edge1", False), ("edge0", True),
                                                             ("edge1", True)]
    down = s.exchange(0, [Transfer(t.src, t.dst, t.link, t.tensors, t.meta, t.direction) for t in up])
    # lambda = samples (1, 3) / 4: the EMA 0.25 * 1 + 0.75 * 2 = 1.75, the model 0.25 * 2 + 0.75 * 4 = 3.5
    assert torch.allclose(s.global_state()["w"], torch.full((2,), 1.75))
    assert torch.allclose(s.inner.global_model["w"], torch.full((2,), 3.5))
    assert s.exchange(0, down) == []
    assert all(torch.allclose(e["w"], torch.full((2,), 1.75)) for e in s.edge_ema)
    assert s.round_metrics(0)["ema"]["synchronized"] is True


def test_personal_models_take_the_ema_of_the_shared_parts():
    s = EMAStrategy(strategy_from(UDecConfig(), 1, 0), EMAConfig(rule="server", decay=0.5))
    s.initialize({"conv_in.weight": torch.zeros(1), "conv_out.weight": torch.zeros(1)})
    s.configure(0)
    s.aggregate(0, [Reply(0, {"conv_out.weight": torch.ones(1)}, 1, {"steps": 1.0})])
    s.exchange(0, [])
    personal = {"conv_in.weight": torch.full((1,), 7.0), "conv_out.weight": torch.full((1,), 9.0)}
    got = s.personal_model(personal)
    assert got["conv_in.weight"].item() == 7.0 and got["conv_out.weight"].item() == 0.5  # the decoder's EMA


@pytest.mark.parametrize("sections, match", [
    ({"ema": {"rule": "edge"}}, "needs a hierarchy"),
    ({"ema": {"rule": "client"}, "algorithm": {"name": "hierfavg"}}, "use \"edge\""),
    ({"ema": {"rule": "client"}, "algorithm": {"name": "udec"}}, "personal models"),
    ({"ema": {"rule": "client"}, "dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}}, "unclipped"),
    ({"ema": {"rule": "client"}, "robust": {"aggregation": "median"}}, "robust"),
    ({"ema": {"evaluate_raw": True}}, "ema.rule = \"off\""),
    ({"ema": {"decay": 1.0}}, "decay"),
    ({"ema": {"rule": "client"}, "algorithm": {"name": "usplit"}}, "complementary parts"),
    ({"ema": {"rule": "client"}, "robust": {"outlier_factor": 3.0}}, "unscreened"),
    ({"ema": {"rule": "server", "evaluate_raw": True}, "algorithm": {"name": "udec"}}, "evaluate_raw"),
])
def test_settings_that_cannot_hold_are_refused(make_config, sections, match):
    with pytest.raises(ConfigError, match=match):
        make_config(**sections)


def ema_of(run_dir):
    _, tensors, _ = run_dir.latest_checkpoint()
    return under(tensors, "strategy/ema/"), under(tensors, "strategy/global/")


@pytest.mark.filterwarnings("ignore:ema.decay")
@pytest.mark.parametrize("ema", [{"rule": "server", "decay": 0.9}, {"rule": "client", "decay": 0.9, "warmup": True}])
def test_the_ema_is_exported_evaluated_and_resumed_exactly(make_config, ema):
    from diffusers import UNet2DModel

    cfg = make_config(run={"num_rounds": 3}, ema={**ema, "evaluate_raw": True})
    full = run(cfg)
    ema_w, raw = ema_of(full)
    assert ema_w.keys() == raw.keys() and not all(torch.equal(ema_w[k], raw[k]) for k in raw)
    exported = UNet2DModel.from_pretrained(full.model_path / "unet").state_dict()
    assert all(torch.equal(exported[k], ema_w[k]) for k in ema_w)  # the pipeline samples from the EMA
    last = full.read_metrics()[-1]
    assert "raw" in last["eval"]["side"] and last["ema"]["rule"] == ema["rule"]
    if ema["rule"] == "client":  # the EMA doubles every message, and the ledger shows it
        plain = run(make_config(run={"num_rounds": 1, "name": "plain"}))
        assert full.read_metrics()[0]["bytes"]["client-server"]["down"] > 1.9 * plain.read_metrics()[0][
            "bytes"]["client-server"]["down"]
    part = run(make_config(run={"num_rounds": 1, "name": "part"}, ema={**ema, "evaluate_raw": True}))
    resumed = resume(part.path, ["run.num_rounds=3"])
    a, b = ema_of(full)[0], ema_of(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_an_ema_is_not_resumed_with_one(make_config):
    from feddiff.runs import RunError

    part = run(make_config(run={"num_rounds": 1}))
    with pytest.raises((ValueError, RunError), match="EMA|ema"):
        resume(part.path, ["run.num_rounds=2", "ema.rule=server"])


@pytest.mark.filterwarnings("ignore:ema.decay")
def test_pruning_ranks_the_trained_model_and_restructures_the_ema_with_it(make_config, monkeypatch):
    import feddiff.prune.wrapper as wrapper

    ranked = []
    real = wrapper.prune_model

    def spy(model, *args, **kwargs):
        ranked.append(model.state_dict()["conv_in.weight"].clone())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(wrapper, "prune_model", spy)
    rd = run(make_config(run={"num_rounds": 2, "keep_checkpoints": 2}, ema={"rule": "server", "decay": 0.9},
                         prune={"ratio": 0.5, "at": 1}))
    after_round_1 = under(rd.load_checkpoint(rd.path / "checkpoints" / "round-00001.safetensors")[1], "strategy/")
    # the channels were ranked on the raw model after round 1, not on its EMA (which lags behind it)
    assert torch.equal(ranked[0], after_round_1["global/conv_in.weight"])
    assert not torch.equal(ranked[0], after_round_1["ema/conv_in.weight"])
    ema_w, raw = ema_of(rd)
    assert {k: v.shape for k, v in ema_w.items()} == {k: v.shape for k, v in raw.items()}
    assert ema_w["conv_in.weight"].shape[0] < 16 and rd.read_metrics()[1]["pruned"]["ratio"] == 0.5


@pytest.mark.filterwarnings("ignore:ema.decay")
def test_a_server_ema_of_a_private_model_runs(make_config):
    rd = run(make_config(ema={"rule": "server", "decay": 0.5},
                         dp={"noise_multiplier": 0.5, "clip_norm": 1.0, "reproducible_noise": True}))
    last = rd.read_metrics()[-1]
    assert last["dp"]["rounds"] == 2 and last["ema"]["step"] == 4  # 2 rounds x 2 configured local steps
