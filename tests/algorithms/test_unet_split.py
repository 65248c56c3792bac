import pytest
import torch

from feddiff.algorithms import Reply, strategy_from as make_strategy
from feddiff.algorithms.unet_split import UDecConfig, ULatDecConfig, USplitConfig
from feddiff.model.parts import group_of


def model_state():
    # one tensor per group is enough to check the bookkeeping
    return {"conv_in.weight": torch.zeros(2), "mid_block.w": torch.zeros(2), "up_blocks.0.w": torch.zeros(2),
            "conv_out.bias": torch.zeros(1)}


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 10])
def test_usplit_assignment(k):
    s = make_strategy(USplitConfig(), k, seed=0)
    s.initialize(model_state())
    for rnd in range(6):
        tasks = s.configure(rnd)
        assert sorted(t.client for t in tasks) == list(range(k))
        uploads = {t.client: set(t.config["upload"]) for t in tasks}
        # everyone downloads the whole model
        assert all(set(t.tensors) == set(model_state()) for t in tasks)
        if k == 1:
            assert uploads[0] == {"encoder", "latent", "decoder"}
            continue
        sides = sorted(len(u) for u in uploads.values())
        # pairs: one client has decoder(+latent), its partner encoder(+latent); one latent per pair
        n_latent = sum("latent" in u for u in uploads.values())
        assert n_latent == k // 2 + k % 2
        assert sum("decoder" in u for u in uploads.values()) >= k // 2
        assert sum("encoder" in u for u in uploads.values()) >= k // 2
        assert all(not {"encoder", "decoder"} <= u for u in uploads.values())
        assert sides[0] >= 1 and sides[-1] == 2


def test_usplit_deterministic_and_varies():
    a = make_strategy(USplitConfig(), 6, seed=1)
    b = make_strategy(USplitConfig(), 6, seed=1)
    for s in (a, b):
        s.initialize(model_state())
    plans = [[(t.client, t.config["upload"]) for t in a.configure(r)] for r in range(8)]
    assert plans == [[(t.client, t.config["upload"]) for t in b.configure(r)] for r in range(8)]
    assert len({str(p) for p in plans}) > 1


def test_usplit_aggregation_hand_computed():
    s = make_strategy(USplitConfig(), 3, seed=0)
    s.initialize(model_state())
    st = model_state()
    dec = {k: v for k, v in st.items() if group_of(k) == "decoder"}
    enc_lat = {k: v for k, v in st.items() if group_of(k) in ("encoder", "latent")}
    replies = [
        Reply(0, {k: torch.full_like(v, 1.0) for k, v in dec.items()}, 10),
        Reply(1, {k: torch.full_like(v, 3.0) for k, v in enc_lat.items()}, 30),
        Reply(2, {k: torch.full_like(v, 8.0) for k, v in dec.items()}, 60),
    ]
    metrics = s.aggregate(0, replies)
    g = s.global_state()
    assert torch.allclose(g["up_blocks.0.w"], torch.full((2,), (1 * 10 + 8 * 60) / 70))
    assert torch.allclose(g["conv_out.bias"], torch.full((1,), (1 * 10 + 8 * 60) / 70))
    assert torch.allclose(g["conv_in.weight"], torch.full((2,), 3.0))
    assert torch.allclose(g["mid_block.w"], torch.full((2,), 3.0))
    assert metrics == {"decoder_clients": 2.0, "encoder_clients": 1.0, "latent_clients": 1.0}


@pytest.mark.parametrize("cfg,shared", [(UDecConfig(), {"decoder"}), (ULatDecConfig(), {"latent", "decoder"})])
def test_udec_ulatdec_messages_and_aggregation(cfg, shared):
    s = make_strategy(cfg, 2, seed=0)
    s.initialize(model_state())
    first = s.configure(0)
    assert all(set(t.tensors) == set(model_state()) for t in first)  # full model once
    assert all(t.config["personal"] and set(t.config["upload"]) == shared for t in first)
    shared_keys = [k for k in model_state() if group_of(k) in shared]
    s.aggregate(0, [Reply(c, {k: model_state()[k] for k in shared_keys}, 1) for c in (0, 1)])
    later = s.configure(1)  # once a client's first reply has arrived, it gets the shared part only
    assert all({group_of(k) for k in t.tensors} == shared for t in later)
    replies = [Reply(0, {k: torch.full((model_state()[k].numel(),), 2.0) for k in shared_keys}, 1),
               Reply(1, {k: torch.full((model_state()[k].numel(),), 5.0) for k in shared_keys}, 2)]
    s.aggregate(1, replies)
    g = s.global_state()
    for k in model_state():
        expected = 4.0 if group_of(k) in shared else 0.0  # (2*1 + 5*2)/3; private parts untouched
        assert torch.allclose(g[k], torch.full_like(g[k], expected)), k
    personal = {k: torch.full_like(v, -1.0) for k, v in model_state().items()}
    merged = s.personal_model(personal)
    assert all(merged[k][0] == (4.0 if group_of(k) in shared else -1.0) for k in merged)
    tensors, meta = s.state_dict()
    t = make_strategy(cfg, 2, seed=0)
    t.load_state_dict(tensors, meta)
    assert all(set(task.tensors) == set(shared_keys) for task in t.configure(2))  # remembers who has the model


@pytest.mark.parametrize("cfg", [UDecConfig(), ULatDecConfig()])
def test_udec_client_whose_first_reply_failed_gets_the_full_model_again(cfg):
    # marking a client initialised at configure broke it once replies can fail: its personal model
    # would never receive the private parts
    s = make_strategy(cfg, 2, seed=0)
    s.initialize(model_state())
    s.configure(0)
    shared_keys = [k for k in model_state() if group_of(k) in s.shared]
    s.aggregate(0, [Reply(0, {k: model_state()[k] for k in shared_keys}, 1)])  # client 1's reply was lost
    tasks = {t.client: t for t in s.configure(1)}
    assert set(tasks[1].tensors) == set(model_state())
    assert {group_of(k) for k in tasks[0].tensors} == set(s.shared)


def test_group_averaging_rejects_unknown_keys_before_writing():
    s = make_strategy(USplitConfig(), 2, seed=0)
    s.initialize(model_state())
    s.configure(0)
    before = {k: v.clone() for k, v in s.global_state().items()}
    bad = [Reply(0, {"conv_in.weight": torch.ones(2)}, 1), Reply(1, {"no_such.w": torch.ones(2)}, 1)]
    with pytest.raises(Exception, match="does not have"):
        s.aggregate(0, bad)
    assert all(torch.equal(before[k], v) for k, v in s.global_state().items())
