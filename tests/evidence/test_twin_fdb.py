"""Two identical labs learning the same MACs at the same moment: each copy counts its own fdb updates only.

``bridge:br_fdb_update`` names a bridge, a port and a MAC -- the same in both
copies -- and no namespace, no skb.  The notification each namespace hears
cannot say which of two simultaneous look-alikes is its own; the kernel's
per-CPU order can: the bridge learns inside the receive of the frame, right
after ``net:netif_receive_skb`` on the same CPU (attribution rule 3).

The first tests are built by hand to make the look-alikes fall on the same
microsecond; the last replays a real recording of two copies whose injections
were released together (``record_twins.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from labctl.evidence.attribution import FDB_UPDATE, Scope, attribute, learnt_from, vouched_events
from labctl.kernel.neighwatch import NeighNote
from labctl.kernel.tracefs import TraceEvent

GOLDEN = Path(__file__).parent / "golden" / "twins-learning.json"
DEVICES = {"eth0", "veth1", "veth2", "br0"}
C1_MAC, C2_MAC = "02:00:00:00:08:01", "02:00:00:00:08:02"
PROCESS, SOFTIRQ = ".....", "..s1."


def _ev(ts: float, cpu: int, pid: int, key: str, context: str, comm: str = "python", **fields: str | int) -> TraceEvent:
    system, _, name = key.partition(":")
    return TraceEvent(ts, cpu, pid, comm, system, name, dict(fields), context)


def _learnt(ts: float, cpu: int, pid: int, port: str, mac: str = "02:00:00:00:08:01", context: str = "..s1.",
            comm: str = "python") -> TraceEvent:
    return _ev(ts, cpu, pid, FDB_UPDATE, context, comm, br_dev="br0", dev=port, addr=mac, vid=0, flags=0)


def _inject(ts: float, cpu: int, pid: int, skb: int, mac: str, port: str) -> list[TraceEvent]:
    """One copy's injected frame: sent from its node, received by its bridge on ``port``, learnt there."""
    return [
        _ev(ts, cpu, pid, "net:net_dev_queue", PROCESS, name="eth0", skbaddr=skb),
        _ev(ts + 2e-6, cpu, pid, "net:netif_rx", PROCESS, name=port, skbaddr=skb),
        _ev(ts + 4e-6, cpu, pid, "net:netif_receive_skb", SOFTIRQ, name=port, skbaddr=skb),
        _learnt(ts + 5e-6, cpu, pid, port, mac),
        _ev(ts + 9e-6, cpu, pid, "skb:consume_skb", SOFTIRQ, skbaddr=skb),
    ]


def _note(port: str, mac: str, received: float) -> NeighNote:
    return NeighNote("fdb", port, mac, "REACHABLE", "br0", received=received)


def _scope(pid: int, notes: list[NeighNote]) -> Scope:
    return Scope(set(DEVICES), {pid}, 0.5, 2.0, notes={"host": notes})


def _merged(*streams: list[TraceEvent]) -> list[TraceEvent]:
    """The trace as read: every CPU's events in order, CPUs merged by time (equal times keep CPU order)."""
    return sorted((e for stream in streams for e in stream), key=lambda e: e.timestamp)


def _fdb_counts(events: list[TraceEvent], scope: Scope) -> Counter[str]:
    """What a check's ``events:`` expectation counts: each kept fdb update by its names."""
    return Counter(name for e in attribute(events, scope)[1] if e.key == FDB_UPDATE for name in e.names())


def _own(events: list[TraceEvent], scope: Scope) -> set[tuple[int, int]]:
    return {(e.cpu, e.pid) for e in attribute(events, scope)[1] if e.key == FDB_UPDATE}


# copies a (pid 100, CPU 0) and b (pid 200, CPU 1) send the same two frames on the same microseconds
A = _inject(1.0, 0, 100, 0xA1, C1_MAC, "veth1") + _inject(1.1, 0, 100, 0xA2, C2_MAC, "veth2")
B = _inject(1.0, 1, 200, 0xB1, C1_MAC, "veth1") + _inject(1.1, 1, 200, 0xB2, C2_MAC, "veth2")
A_NOTES = [_note("veth1", C1_MAC, 1.0003), _note("veth2", C2_MAC, 1.1003)]
B_NOTES = [_note("veth1", C1_MAC, 1.0002), _note("veth2", C2_MAC, 1.1002)]


def test_simultaneous_look_alikes_each_go_to_the_copy_whose_skb_was_learnt() -> None:
    events = _merged(A, B)
    expected = Counter({"bridge:br_fdb_update": 2, "bridge:br_fdb_update@br0": 2,
                        "bridge:br_fdb_update@veth1": 1, "bridge:br_fdb_update@veth2": 1})
    for pid, notes in ((100, A_NOTES), (200, B_NOTES)):
        scope = _scope(pid, notes)
        assert _fdb_counts(events, scope) == expected
        assert _own(events, scope) == {(pid // 100 - 1, pid)}  # its own CPU's updates, not the twin's


def test_notifications_alone_cannot_tell_the_look_alikes_apart() -> None:
    """Why rule 3 is needed: both copies' notifications point at the same pair of updates."""
    events = _merged(A, B)
    chosen = [
        {(e.cpu, e.pid) for e in vouched_events(events, _scope(pid, notes))}  # no skb owners: notes only
        for pid, notes in ((100, A_NOTES), (200, B_NOTES))
    ]
    assert chosen[0] == chosen[1]  # one copy would count the other's updates as its own


def test_a_look_alike_learnt_from_a_foreign_send_is_never_vouched_for() -> None:
    """Copy a heard its bridge learn, but its own update is not in the trace: the twin's is not taken instead."""
    scope = _scope(100, [_note("veth1", C1_MAC, 1.0003)])
    assert _fdb_counts(_merged(B[:5]), scope) == Counter()


def test_without_a_skb_the_closest_look_alike_is_vouched_for() -> None:
    """An update learnt from a frame nobody's task sent (a neighbour timer's ARP probe) has only its note."""
    probe = [
        _ev(1.0, 0, 24, "net:netif_receive_skb", SOFTIRQ, "ksoftirqd/0", name="veth1", skbaddr=0xC1),
        _learnt(1.000001, 0, 24, "veth1", comm="ksoftirqd/0"),
    ]
    scope = _scope(100, [_note("veth1", C1_MAC, 1.0002)])
    assert _fdb_counts(probe, scope)["bridge:br_fdb_update@veth1"] == 1


def test_an_update_is_tied_only_to_the_receive_just_before_it_on_its_cpu() -> None:
    receive = _ev(1.0, 0, 100, "net:netif_receive_skb", SOFTIRQ, name="veth1", skbaddr=0xA1)

    def update(ts: float = 1.000001, cpu: int = 0, pid: int = 100, context: str = SOFTIRQ, dev: str = "veth1"
               ) -> TraceEvent:
        return _learnt(ts, cpu, pid, dev, context=context)

    def tied(*events: TraceEvent) -> bool:
        return id(events[-1]) in learnt_from(list(events))

    assert tied(receive, update())
    assert not tied(receive, update(cpu=1))  # another CPU: another call
    assert not tied(receive, update(pid=200))  # another task
    assert not tied(receive, update(context=PROCESS))  # a user's `bridge fdb ... use`, not the rx handler
    assert not tied(receive, update(dev="veth2"))  # learnt on another port: not this frame
    assert not tied(receive, update(ts=1.5))  # long after: not the same call
    freed = _ev(1.0000005, 0, 100, "skb:kfree_skb", SOFTIRQ, skbaddr=0xA1)
    assert not tied(receive, freed, update())  # the frame died before anything was learnt
    other = _ev(1.0000005, 0, 100, "net:netif_receive_skb", SOFTIRQ, name="veth1", skbaddr=0xB1)
    assert id(other) == id(learnt_from([receive, other, update()]).popitem()[1])  # the latest receive


def test_a_trace_with_lost_events_ties_nothing() -> None:
    """A CPU's order with holes proves nothing: the notifications alone decide (and may find nothing)."""
    scope = _scope(100, [])
    scope.lost = 3
    assert _fdb_counts(_merged(A, B), scope) == Counter()


# --------------------------------------------------------------------------- recorded


def _event(data: dict[str, Any]) -> TraceEvent:
    return TraceEvent(**data)


def _recorded_scope(data: dict[str, Any]) -> Scope:
    notes = {node: [NeighNote(**n) for n in found] for node, found in data["notes"].items()}
    return Scope(set(data["devices"]), set(data["tasks"]), data["since"], data["until"], notes, set(data["relays"]),
                 data["unreachable"], data.get("lost", 0))


def test_recorded_twins_each_count_their_own_two_updates() -> None:
    """Two real copies' windows (each holds both copies' events): in → each copy's counts out."""
    recording = json.loads(GOLDEN.read_text())
    own: list[set[tuple[float, int, int]]] = []
    by_notes: list[set[tuple[float, int, int]]] = []
    for copy in ("a", "b"):
        events = [_event(e) for e in recording[copy]["events"]]
        scope = _recorded_scope(recording[copy]["scope"])
        look_alikes = [e for e in events if e.key == FDB_UPDATE and scope.since <= e.timestamp <= scope.until]
        assert len(look_alikes) >= 4  # both copies' updates are in each copy's trace
        counts = _fdb_counts(events, scope)
        assert counts["bridge:br_fdb_update"] == 2 and counts["bridge:br_fdb_update@veth1"] == 1
        kept = {(e.timestamp, e.cpu, e.pid) for e in attribute(events, scope)[1] if e.key == FDB_UPDATE}
        assert {pid for _, _, pid in kept} <= scope.tasks  # learnt in its own senders' softirq
        own.append(kept)
        by_notes.append({(e.timestamp, e.cpu, e.pid) for e in vouched_events(sorted(events, key=lambda e: e.timestamp),
                                                                             scope) if e.key == FDB_UPDATE})
    assert not own[0] & own[1]
    # recorded as it happened: copy a read its notifications 2 ms late, after copy b's look-alikes -- the
    # notifications alone picked b's updates for a (same count, someone else's events)
    assert by_notes[0] == by_notes[1] == own[1]


def test_a_notification_read_late_still_takes_its_own_update_and_no_look_alike() -> None:
    """Under load the reader may wake long after the kernel sent: its own update is taken, not a third one."""
    probe = [  # a twin's neighbour timer probe, learnt just before the late notification (no one's send)
        _ev(1.38, 1, 24, "net:netif_receive_skb", SOFTIRQ, "ksoftirqd/1", name="veth1", skbaddr=0xC1),
        _learnt(1.380001, 1, 24, "veth1", comm="ksoftirqd/1"),
    ]
    late = [_note("veth1", C1_MAC, 1.4), _note("veth2", C2_MAC, 1.4001)]  # 0.4 s after copy a's updates
    counts = _fdb_counts(_merged(A, B, probe), _scope(100, late))
    assert counts["bridge:br_fdb_update"] == 2 and counts["bridge:br_fdb_update@veth1"] == 1
