"""The learning-rate schedule across rounds."""

import pytest

from feddiff.client.runtime import lr_factor


def test_cosine_schedule_by_hand_and_past_its_end():
    # 3 rounds, min ratio 0.1: 1, 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55, 0.1; an added round stays at 0.1
    got = [lr_factor(r, 3, "cosine", 0.1) for r in range(5)]
    assert got == pytest.approx([1.0, 0.55, 0.1, 0.1, 0.1])
    assert [lr_factor(r, 1, "cosine", 0.1) for r in range(2)] == [1.0, 0.1]
    assert [lr_factor(r, 3, "constant", 0.1) for r in range(4)] == [1.0] * 4
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(0, 3, "step", 0.1)


def test_client_state_from_flat_ignores_other_keys():
    import torch

    from feddiff.client.runtime import ClientState

    st = ClientState.from_flat({"strategy/global/x": torch.zeros(1), "loose": torch.zeros(1),
                                "tensors/ef/w": torch.ones(1)},
                               {"steps_done": 2, "has_optimizer": False, "has_personal": False})
    assert st.steps_done == 2 and list(st.tensors) == ["ef/w"]
