import pytest
import torch

from feddiff.algorithms import strategy_from as make_strategy
from feddiff.client.train import LocalTrainSpec, train_local
from feddiff.algorithms.fedprox import FedProxConfig, ProxTerm
from feddiff.model.diffusion import make_scheduler
from feddiff.model.presets import build_unet, unet_kwargs


def test_fedprox_sends_mu():
    s = make_strategy(FedProxConfig(mu=0.3), 2, 0)
    s.initialize({"w": torch.zeros(1)})
    assert all(t.config["prox_mu"] == 0.3 for t in s.configure(0))
    with pytest.warns(UserWarning, match="mu=0 is FedAvg"):
        make_strategy(FedProxConfig(mu=0.0), 2, 0)


def dist_after_training(mu: float) -> float:
    model = build_unet(unet_kwargs("tiny", 1, 8), 0)
    anchor = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 255, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    spec = LocalTrainSpec(lr=1e-2, batch_size=8, local_steps=12, grad_clip=0)
    terms = [ProxTerm(mu, anchor)] if mu > 0 else []
    res = train_local(model, images, spec, make_scheduler(), torch.Generator().manual_seed(0), terms=terms)
    d = sum(((model.state_dict()[k] - anchor[k]) ** 2).sum() for k in anchor).item()
    if mu > 0:
        assert res.metrics["prox_dist2"] == pytest.approx(d, rel=1e-4)
    return d


def test_proximal_term_pulls_towards_global():
    d = [dist_after_training(mu) for mu in (0.0, 1.0, 10.0, 100.0)]
    assert d[0] > d[1] > d[2] > d[3], d
    assert d[3] < 0.5 * d[0]


def test_prox_gradient_matches_autograd_of_the_objective():
    """train_local adds mu (w - w_global) to the gradient; a loop with (mu/2)||w - w_global||^2 in the
    loss (autograd) must give the same weights after two Adam steps."""
    from feddiff.data.transforms import to_model_range
    from feddiff.model.diffusion import denoising_loss

    images = torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sched, mu = make_scheduler(), 5.0
    a = build_unet(unet_kwargs("tiny", 1, 8), 0)
    anchor = {k: v.clone() + 0.01 for k, v in a.state_dict().items()}  # w != w_global from the start
    spec = LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=2, grad_clip=0)
    train_local(a, images, spec, sched, torch.Generator().manual_seed(0), terms=[ProxTerm(mu, anchor)])

    b = build_unet(unet_kwargs("tiny", 1, 8), 0)
    opt = torch.optim.Adam(b.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # one epoch of one full batch per step, as train_local draws it
        x0 = to_model_range(images[torch.randperm(8, generator=g)])
        loss = denoising_loss(b, x0, sched, g)
        prox = sum(((p - anchor[n]) ** 2).sum() for n, p in b.named_parameters())
        opt.zero_grad()
        (loss + 0.5 * mu * prox).backward()
        opt.step()
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k
