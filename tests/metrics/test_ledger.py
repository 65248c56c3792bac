"""The communication ledger: per link, per node and cumulative byte counts."""

import pytest

from feddiff.metrics.ledger import Ledger


def test_rounds_by_link_node_and_direction():
    ledger = Ledger()
    ledger.record("client-server", "down", "client0", 100)
    ledger.record("client-server", "up", "client0", 40)
    ledger.record("client-server", "down", "client1", 100)
    ledger.record("eval", "up", "client0", 7)
    r1 = ledger.close_round()
    assert r1["bytes"] == {"client-server": {"down": 200, "up": 40}, "eval": {"down": 0, "up": 7}}
    assert r1["bytes_per_node"]["client-server"]["client0"] == {"down": 100, "up": 40}
    assert r1["bytes_per_node"]["eval"] == {"client0": {"down": 0, "up": 7}}
    ledger.record("client-server", "up", "client1", 60)
    r2 = ledger.close_round()
    assert r2["bytes"] == {"client-server": {"down": 0, "up": 60}}
    assert r2["bytes_cumulative"]["client-server"] == {"down": 200, "up": 100}
    assert r2["bytes_total_cumulative"] == 307

    restored = Ledger()
    restored.load_state_dict(ledger.state_dict())
    restored.record("eval", "down", "client1", 3)
    assert restored.close_round()["bytes_total_cumulative"] == 310
    with pytest.raises(ValueError, match="direction must be one of .*got 'sideways'"):
        ledger.record("client-server", "sideways", "client0", 1)
