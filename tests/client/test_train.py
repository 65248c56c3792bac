import pytest
import torch

from feddiff.client.train import LocalTrainSpec, train_local
from feddiff.model.diffusion import make_scheduler
from feddiff.model.presets import build_unet, unet_kwargs


def setup(seed=0):
    model = build_unet(unet_kwargs("tiny", 1, 8), seed)
    images = torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return model, images, make_scheduler()


def test_step_count_epochs_and_steps():
    assert LocalTrainSpec(lr=1e-3, batch_size=8, local_epochs=2).num_steps(20) == 6  # 2 * ceil(20/8)
    assert LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=5).num_steps(20) == 5
    model, images, sched = setup()
    ticks = []
    res = train_local(model, images, LocalTrainSpec(lr=1e-3, batch_size=8, local_epochs=2), sched,
                      torch.Generator().manual_seed(0), progress=lambda: ticks.append(1))
    assert res.num_steps == 6 and len(ticks) == 6 and res.loss > 0


def test_same_generator_same_result():
    outs = []
    for _ in range(2):
        model, images, sched = setup()
        train_local(model, images, LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=3), sched, torch.Generator().manual_seed(4))
        outs.append(model.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_warmup_scales_first_steps():
    # with warm-up over 1000 steps the first 2 steps move weights ~500x less than without
    deltas = []
    for warm in (0, 1000):
        model, images, sched = setup()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_local(model, images, LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=2, warmup_steps=warm, grad_clip=0),
                    sched, torch.Generator().manual_seed(0))
        deltas.append(sum((model.state_dict()[k] - before[k]).abs().sum() for k in before))
    assert deltas[1] < deltas[0] / 100


def test_kept_optimizer_state_is_returned_and_used():
    model, images, sched = setup()
    spec = LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=2)
    res = train_local(model, images, spec, sched, torch.Generator().manual_seed(0), optimizer_state={})
    st = res.optimizer_state
    assert st and st["conv_in.weight/step"].item() == 2
    res2 = train_local(model, images, spec, sched, torch.Generator().manual_seed(1), optimizer_state=st)
    assert res2.optimizer_state["conv_in.weight/step"].item() == 4
    assert train_local(model, images, spec, sched, torch.Generator().manual_seed(1)).optimizer_state is None


def test_prox_needs_anchor():
    from feddiff.algorithms.fedprox import ProxTerm

    model, images, sched = setup()
    with pytest.raises(ValueError, match="anchor"):
        train_local(model, images, LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=1), sched,
                    torch.Generator().manual_seed(0), terms=[ProxTerm(0.1, {})])


def test_sgd_option_is_plain_sgd_and_keeps_its_momentum():
    # one SGD step without clipping: w <- w - lr * grad, checked against autograd on the same batch
    from feddiff.data.transforms import to_model_range
    from feddiff.model.diffusion import denoising_loss

    model, images, sched = setup()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LocalTrainSpec(lr=0.1, batch_size=len(images), local_steps=1, grad_clip=0, optimizer="sgd")
    res = train_local(model, images, spec, sched, torch.Generator().manual_seed(0), optimizer_state={})
    assert res.optimizer_state == {}  # plain SGD keeps no state
    twin, g = setup()[0], torch.Generator().manual_seed(0)
    twin.load_state_dict(ref)
    x0 = to_model_range(images[torch.randperm(len(images), generator=g)])
    denoising_loss(twin, x0, sched, g).backward()
    for n, p in twin.named_parameters():
        assert torch.allclose(model.state_dict()[n], ref[n] - 0.1 * p.grad, atol=1e-6), n
    spec_m = LocalTrainSpec(lr=0.1, batch_size=8, local_steps=2, grad_clip=0, optimizer="sgd", momentum=0.9)
    res = train_local(model, images, spec_m, sched, torch.Generator().manual_seed(1), optimizer_state={})
    assert res.optimizer_state and all(k.endswith("/momentum_buffer") for k in res.optimizer_state)


def test_before_step_sees_the_clipped_gradient():
    from feddiff.client.train import LocalTerm

    class Probe(LocalTerm):
        norms: list = []

        def start(self, names, params):
            self.params = params

        def before_step(self):
            self.norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in self.params))))

    model, images, sched = setup()
    probe = Probe()
    spec = LocalTrainSpec(lr=1e-3, batch_size=8, local_steps=3, grad_clip=0.01)
    train_local(model, images, spec, sched, torch.Generator().manual_seed(0), terms=[probe])
    assert len(probe.norms) == 3 and all(n <= 0.01 * (1 + 1e-5) for n in probe.norms)
