"""The Flower engine: feddiff's round loop over Flower's deployment engine (SuperLink + SuperNodes).

Only this package imports ``flwr`` (the optional extra ``feddiff[flower]``). The server side is the same
:class:`~feddiff.engines.loop.Server` as the simulator's, over :class:`~feddiff.engines.flower.grid.FlowerEngine`,
whose ``send_and_receive`` carries feddiff's own message bytes (codecs, CRC, header) inside Flower messages,
so the ledger counts the same bytes. The client side is :class:`~feddiff.engines.flower.node.NodeSession`
around the same :class:`~feddiff.client.node.ClientNode`, with the client's record kept in the node's
``Context.state``. ``apps.py`` makes the ServerApp and ClientApp; ``local.py`` starts a deployment on loopback.
"""

from __future__ import annotations


def require_flwr():
    """The ``flwr`` module, or an error that says how to install it."""
    try:
        import flwr
    except ImportError:
        raise ImportError("feddiff's Flower engine needs flwr: pip install 'feddiff[flower]' "
                          "(make test installs it)") from None
    return flwr
