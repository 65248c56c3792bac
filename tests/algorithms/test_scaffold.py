"""SCAFFOLD (option II) against hand-computed steps."""

import pytest
import torch

from feddiff.algorithms import Reply, Task, strategy_from
from feddiff.algorithms.scaffold import STATE, ScaffoldClient, ScaffoldConfig, ScaffoldTerm, control_update
from feddiff.client.runtime import ClientState
from feddiff.client.train import LocalTrainSpec, train_local
from feddiff.model.diffusion import make_scheduler
from feddiff.model.presets import build_unet, unet_kwargs


def test_control_update_by_hand():
    # c_i+ = c_i - c + (x - y)/(K lr) = 1 - 0.5 + (2 - 1)/(2 * 0.25) = 2.5
    got = control_update(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(2.0), torch.tensor(1.0), 2, 0.25)
    assert got.item() == 2.5
    with pytest.raises(ValueError, match="K >= 1"):
        control_update(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(2.0), torch.tensor(1.0), 0, 0.25)


def test_two_client_server_step_by_hand():
    s = strategy_from(ScaffoldConfig(), 4, seed=0)
    s.initialize({"w": torch.zeros(2)})
    tasks = s.configure(0)
    assert all(set(t.extras) == {"c/w"} and torch.equal(t.extras["c/w"], torch.zeros(2)) for t in tasks)
    replies = [Reply(0, {"w": torch.tensor([1.0, 2.0])}, 10, extras={"dc/w": torch.tensor([0.4, 0.0])}),
               Reply(1, {"w": torch.tensor([3.0, 4.0])}, 30, extras={"dc/w": torch.tensor([0.2, 0.2])})]
    s.aggregate(0, replies)
    assert s.global_state()["w"].tolist() == [2.0, 3.0]  # uniform mean, eta_g = 1
    # c <- c + (1/N) sum dc = (1/4) (0.6, 0.2)
    assert s.control["w"].tolist() == pytest.approx([0.15, 0.05])
    w = strategy_from(ScaffoldConfig(weighting="samples", global_lr=0.5), 4, seed=0)
    w.initialize({"w": torch.zeros(2)})
    w.aggregate(0, replies)
    assert w.global_state()["w"].tolist() == pytest.approx([0.5 * 2.5, 0.5 * 3.5])  # x + 0.5 (mean_n(y) - x)
    assert s.expected_extras(tasks[0]).keys() == {"dc/w"}


def test_reset_every_zeroes_controls_on_both_sides():
    s = strategy_from(ScaffoldConfig(reset_every=2), 2, seed=0)
    s.initialize({"w": torch.zeros(1)})
    s.control = {"w": torch.ones(1)}
    assert "reset_controls" not in s.configure(1)[0].config
    t = s.configure(2)[0]
    assert t.config["reset_controls"] and t.extras["c/w"].item() == 0
    state = ClientState(tensors={f"{STATE}w": torch.ones(1)})
    c, c_i = ScaffoldClient(None).controls(t, state)
    assert c_i["w"].item() == 0 and f"{STATE}w" not in state.tensors


def test_local_step_uses_the_corrected_gradient_and_updates_c_i():
    """One plain-SGD step: y = x - lr (g - c_i + c); then c_i+ = c_i - c + (x - y)/(K lr) = g exactly."""
    from feddiff.data.transforms import to_model_range
    from feddiff.model.diffusion import denoising_loss

    sched = make_scheduler()
    images = torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    model = build_unet(unet_kwargs("tiny", 1, 8), 0)
    x = {k: v.clone() for k, v in model.state_dict().items()}
    c = {k: torch.full_like(v, 0.01) for k, v in x.items()}
    c_i = {k: torch.full_like(v, -0.02) for k, v in x.items()}
    lr = 0.1
    spec = LocalTrainSpec(lr=lr, batch_size=8, local_steps=1, grad_clip=0, optimizer="sgd")
    res = train_local(model, images, spec, sched, torch.Generator().manual_seed(0), terms=[ScaffoldTerm(c, c_i)])

    twin = build_unet(unet_kwargs("tiny", 1, 8), 0)
    g = torch.Generator().manual_seed(0)
    x0 = to_model_range(images[torch.randperm(8, generator=g)])
    denoising_loss(twin, x0, sched, g).backward()
    grads = {n: p.grad for n, p in twin.named_parameters()}
    y = model.state_dict()
    for n in grads:
        assert torch.allclose(y[n], x[n] - lr * (grads[n] - c_i[n] + c[n]), atol=1e-6), n

    state = ClientState(tensors={f"{STATE}{k}": v for k, v in c_i.items()})
    task = Task(0, x, {"round": 0, "upload": "all"}, extras={f"c/{k}": v for k, v in c.items()})
    extras = ScaffoldClient(None).reply_extras(task, state, y, res)
    for n in grads:  # with one SGD step the new control is the gradient itself
        assert torch.allclose(state.tensors[f"{STATE}{n}"], grads[n], atol=1e-4), n
        assert torch.allclose(extras[f"dc/{n}"], grads[n] - c_i[n], atol=1e-4), n
