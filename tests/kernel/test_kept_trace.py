"""One tracefs instance kept across a lab's windows (labctl/evidence/kept_trace.py), on the real kernel.

What must hold: a resumed instance records what a fresh one would -- nothing from while it was paused,
nothing left from the window before, exactly the new window's events, its own lost count -- and no
instance outlives the scope, a failed window or a mismatched request.
"""

from __future__ import annotations

import os
import time

import pytest

from labctl.evidence.kept_trace import TraceKeeper, kept_traces, stop_recording, trace_session
from labctl.kernel import tracefs
from labctl.kernel.tracefs.kept import KeptSession
from tests.kernel.conftest import Topo
from tests.kernel.conftest import VethPair as Pair

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and tracefs")

EVENTS = ("skb:kfree_skb", "net:net_dev_queue", "net:netif_receive_skb")
CLOSED_PORT = 9
PAYLOAD = b"k" * 77
FRAME = 14 + 20 + 8 + len(PAYLOAD)


@pytest.fixture
def pair(topo: Topo) -> Pair:
    return topo.pair(Pair, "kt", "10.78.0.1", "10.78.0.2")


def _sent(events: list[tracefs.TraceEvent], pair: Pair) -> list[tracefs.TraceEvent]:
    """The datagrams ``a`` sent, by their length (not its ARP; ``b``'s port unreachables go the other way)."""
    return [
        e for e in events if e.device == pair.dev_a and e.key == "net:net_dev_queue" and e.fields["len"] == FRAME
    ]


def _mine() -> list[str]:
    return [n for n in tracefs.list_instances() if n.startswith(f"labctl-{os.getpid()}-")]


def test_a_resumed_instance_records_nothing_of_the_pause_or_the_window_before(pair: Pair) -> None:
    keeper = TraceKeeper()
    try:
        with keeper.session(EVENTS, 1024) as first:
            pair.send_to_b(PAYLOAD, 3, CLOSED_PORT)
            time.sleep(0.05)
            stop_recording(first)
            assert len(_sent(first.events(), pair)) == 3
            pair.send_to_b(PAYLOAD, 2, CLOSED_PORT)  # recorded by nobody: the window is over
        assert _mine() == [first.name]  # paused, not removed
        pair.send_to_b(PAYLOAD, 4, CLOSED_PORT)  # between windows: recording is off
        time.sleep(0.05)
        with keeper.session(("skb:kfree_skb", "net:net_dev_queue"), 1024) as second:
            assert second is first
            assert second.enabled == ["skb:kfree_skb", "net:net_dev_queue"]
            assert _enabled(second) == {"skb:kfree_skb", "net:net_dev_queue"}  # the kernel's view, not ours
            pair.send_to_b(PAYLOAD, 1, CLOSED_PORT)
            time.sleep(0.05)
            stop_recording(second)
            events = second.events()
        assert len(_sent(events, pair)) == 1  # one send: none of the six before
        assert not [e for e in events if e.key == "net:netif_receive_skb"]  # no longer enabled
        assert second.lost_events() == 0
    finally:
        keeper.close()
    assert _mine() == []


def _enabled(session: tracefs.TraceSession) -> set[str]:
    found = set()
    for event in tracefs.resolve_events(["skb:*", "net:*"])[0]:
        system, _, name = event.partition(":")
        with open(os.path.join(session.path, "events", system, name, "enable")) as f:
            if f.read().strip() == "1":
                found.add(event)
    return found


def test_lost_events_count_from_the_resume(pair: Pair) -> None:
    keeper = TraceKeeper()
    try:
        with keeper.session(EVENTS, 8) as small:  # 8 KB per CPU: a burst overflows it
            pair.send_to_b(b"x", 3000, CLOSED_PORT)
            stop_recording(small)
            assert small.lost_events() > 0
        with keeper.session(EVENTS, 8) as again:
            assert again is small
            stop_recording(again)
            assert again.lost_events() == 0  # nothing sent: the first window's losses are not this one's
    finally:
        keeper.close()


def test_a_failed_window_or_another_buffer_size_gets_a_fresh_instance() -> None:
    keeper = TraceKeeper()
    try:
        with pytest.raises(ZeroDivisionError), keeper.session(EVENTS, 1024) as failed:
            1 / 0  # noqa: B018
        assert not os.path.exists(failed.path)
        with keeper.session(EVENTS, 1024) as first:
            pass
        with keeper.session(EVENTS, 2048) as bigger:
            assert bigger is not first and not os.path.exists(first.path)
        assert _mine() == [bigger.name]
    finally:
        keeper.close()
    assert _mine() == []


def test_windows_share_an_instance_only_inside_kept_traces() -> None:
    with trace_session(EVENTS, 1024) as alone:
        assert not isinstance(alone, KeptSession)
    assert _mine() == []
    with kept_traces():
        with trace_session(EVENTS, 1024) as one:
            stop_recording(one)
        with trace_session(EVENTS, 1024) as two:
            stop_recording(two)
        assert two is one and _mine() == [one.name]
    assert _mine() == []
