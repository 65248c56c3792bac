"""Owned randomness leaves the global RNGs as it found them: CPU, and every CUDA device (mocked here)."""

from __future__ import annotations

import pytest
import torch

from feddiff.model.presets import build_unet, unet_kwargs
from feddiff.seeding import derive_seed, global_rng


class FakeCuda:
    """Two pretend CUDA devices whose RNG states are plain values, patched into ``torch.cuda``.

    Every way of reading, setting or seeding a device generator goes through ``states``, so a test
    sees what a seeding function touched and whether it put it back.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 2):
        self.states = {i: f"initial-{i}" for i in range(count)}
        fake = self

        class Generator:
            def __init__(self, index: int):
                self.index = index

            def manual_seed(self, seed: int) -> Generator:
                fake.states[self.index] = ("seeded", int(seed))
                return self

        cuda = torch.cuda
        patches = {
            "is_available": lambda: True,
            "is_initialized": lambda: True,
            "_is_in_bad_fork": lambda: False,
            "device_count": lambda: count,
            "current_device": lambda: 0,
            "get_rng_state": lambda device="cuda": self.states[self._index(device)],
            "set_rng_state": self._set_state,
            "manual_seed": lambda seed: self.states.__setitem__(0, ("seeded", int(seed))),
            "manual_seed_all": lambda seed: self.states.update({i: ("seeded", int(seed)) for i in self.states}),
            "default_generators": tuple(Generator(i) for i in range(count)),
        }
        for name, value in patches.items():
            monkeypatch.setattr(cuda, name, value, raising=False)

    @staticmethod
    def _index(device: int | str | torch.device) -> int:
        d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return 0 if d.index is None else d.index

    def _set_state(self, state: object, device: int | str | torch.device = "cuda") -> None:
        self.states[self._index(device)] = state


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return FakeCuda(monkeypatch)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_global_rng_restores_every_cuda_device(fake_cuda, device):
    before = dict(fake_cuda.states)
    cpu_before = torch.get_rng_state()
    seed = derive_seed(7, "dropout", 2, 1)
    with global_rng(device, 7, "dropout", 2, 1):
        assert torch.initial_seed() == seed
        if device != "cpu":  # the target device draws from the seeded state (dropout on CUDA)
            assert fake_cuda.states[FakeCuda._index(device)] == ("seeded", seed)
    assert fake_cuda.states == before
    assert torch.equal(torch.get_rng_state(), cpu_before)


def test_build_unet_leaves_cuda_rng_alone(fake_cuda):
    before = dict(fake_cuda.states)
    build_unet(unet_kwargs("tiny", 1, 8), 5)
    assert fake_cuda.states == before


def test_global_rng_cpu_is_seeded_and_restored():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with global_rng("cpu", 1, "kid"):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with global_rng("cpu", 1, "kid"):
        b = torch.rand(4)
    with torch.random.fork_rng(devices=[]):  # what torch.manual_seed gives: draws are unchanged
        torch.manual_seed(derive_seed(1, "kid"))
        expected = torch.rand(4)
    assert torch.equal(a, b) and torch.equal(a, expected)
    assert torch.equal(torch.get_rng_state(), before)


def test_build_unet_restores_cpu_rng_and_keeps_its_weights():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    state = build_unet(unet_kwargs("tiny", 1, 8), 5).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    with torch.random.fork_rng(devices=[]):  # the weights torch.manual_seed(seed) gave: bit-identical
        from diffusers import UNet2DModel

        torch.manual_seed(5)
        expected = UNet2DModel(**unet_kwargs("tiny", 1, 8)).state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
