"""Names shared by every layer: the state-dict type and how nodes are named on links and in the ledger."""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]
"""Named tensors: a model's ``state_dict()``, an optimizer's flattened state, a message's payload."""


def client_node(k: int) -> str:
    """The node name of client ``k`` in messages, the ledger and metrics (``client3``)."""
    return f"client{k}"


def under(tensors: StateDict, prefix: str) -> StateDict:
    """The entries of ``tensors`` named ``<prefix><name>``, as ``name`` (a section of a flat checkpoint or record)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def clone_state(state: StateDict) -> StateDict:
    """A detached copy of every tensor (the owner of the copy may change it in place)."""
    return {k: v.detach().clone() for k, v in state.items()}
