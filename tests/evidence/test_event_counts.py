"""Evidence.event_counts: every name an ``events:`` expectation may use, counted exactly as each event names itself."""

from __future__ import annotations

from collections import Counter

from labctl.evidence.model import Evidence
from labctl.kernel.tracefs import TraceEvent


def _ev(ts: float, key: str, **fields: str | int) -> TraceEvent:
    system, _, name = key.partition(":")
    return TraceEvent(ts, 0, 1, "python", system, name, dict(fields), ".....")


def test_event_counts_name_every_event_by_key_and_by_each_device() -> None:
    events = (
        *(_ev(i, "net:netif_rx", name="eth0", skbaddr=0x10 + i) for i in range(5)),
        _ev(9.0, "net:netif_rx", name="lo", skbaddr=0x99),
        _ev(10.0, "bridge:br_fdb_update", br_dev="br0", dev="veth1"),  # a bridge event names the bridge and the port
        _ev(11.0, "skb:kfree_skb", reason="NO_SOCKET"),  # no device: counted by its key only
    )
    counts = Evidence(events=events).event_counts()
    assert counts == Counter(name for event in events for name in event.names())
    assert counts["net:netif_rx"] == 6 and counts["net:netif_rx@eth0"] == 5 and counts["net:netif_rx@lo"] == 1
    assert counts["bridge:br_fdb_update@br0"] == counts["bridge:br_fdb_update@veth1"] == 1
    assert counts["skb:kfree_skb"] == 1
