"""Skbs made in softirq while a lab task was current: the CPU's order says whose they are.

Softirq work runs in whichever task is current, so a lab sender's context
also runs other namespaces' timers and replies.  Every lab has an ``eth0``;
the device name proves nothing.  These traces are built by hand on one CPU,
in the order the kernel's calls produce them.
"""

from __future__ import annotations

from collections import Counter

from labctl.evidence.attribution import Scope, attribute
from labctl.kernel.neighwatch import NeighNote
from labctl.kernel.tracefs import TraceEvent

LAB = 100
"""The lab's sender thread: current on CPU 0 while the softirqs below run."""
SOFTIRQ, PROCESS = "..s1.", "....."


def _ev(ts: float, key: str, context: str = SOFTIRQ, pid: int = LAB, **fields: str | int) -> TraceEvent:
    system, _, name = key.partition(":")
    return TraceEvent(ts, 0, pid, "python", system, name, dict(fields), context)


def _scope(notes: list[NeighNote] | None = None) -> Scope:
    return Scope({"eth0"}, {LAB}, 0.5, 2.0, notes={"client": notes or []})


def _counts(events: list[TraceEvent], scope: Scope) -> Counter[str]:
    return Counter(name for e in attribute(events, scope)[1] for name in e.names())


def _probe(ts: float) -> list[TraceEvent]:
    """A neighbour timer's unicast ARP probe: sent, handed to the veth peer, then the timer's tracepoint."""
    return [
        _ev(ts, "net:net_dev_queue", name="eth0", skbaddr=0x51),
        _ev(ts + 2e-6, "net:netif_rx", name="eth0", skbaddr=0x51),
        _ev(ts + 3e-6, "neigh:neigh_timer_handler", dev="eth0", primary_key4="10.0.4.2", nud_state="probe"),
    ]


def test_a_timer_probe_in_the_lab_tasks_context_is_the_labs_only_when_its_namespace_vouches() -> None:
    events = _probe(1.0)
    assert _counts(events, _scope())["net:netif_rx@eth0"] == 0  # another namespace's neighbour timer
    note = NeighNote("neigh", "eth0", "10.0.4.2", "PROBE", received=1.0002)
    assert _counts(events, _scope([note]))["net:netif_rx@eth0"] == 1  # the lab's own


def _reply_to(receive_pid: int, context: str) -> list[TraceEvent]:
    """A frame sent by ``receive_pid`` is received in the lab task's softirq, and answered right there."""
    return [
        _ev(1.0, "net:net_dev_queue", context, pid=receive_pid, name="eth0", skbaddr=0x61),
        _ev(1.000002, "net:netif_receive_skb", name="eth0", skbaddr=0x61),
        _ev(1.000004, "net:net_dev_queue", name="eth0", skbaddr=0x62),  # the answer, made in that receive
        _ev(1.000006, "net:netif_rx", name="eth0", skbaddr=0x62),
        _ev(1.000008, "skb:consume_skb", skbaddr=0x61),
    ]


def test_an_answer_to_another_tasks_frame_is_not_the_labs() -> None:
    assert _counts(_reply_to(300, PROCESS), _scope())["net:netif_rx@eth0"] == 0
    assert _counts(_reply_to(LAB, PROCESS), _scope())["net:netif_rx@eth0"] == 1  # an answer to the lab's own


def test_an_address_freed_by_a_gro_merge_and_reused_by_another_skb_starts_a_new_story() -> None:
    """GRO frees a merged segment untraced; the next skb on the CPU -- another namespace's answer -- reuses it."""
    events = [
        _ev(1.0, "net:net_dev_queue", PROCESS, name="eth0", skbaddr=0x71),  # the lab's datagram
        _ev(1.000002, "net:napi_gro_receive_entry", name="eth0", skbaddr=0x71),  # merged: freed untraced
        _ev(1.000010, "net:net_dev_queue", PROCESS, pid=300, name="eth0", skbaddr=0x72),  # another lab's frame
        _ev(1.000012, "net:netif_receive_skb", name="eth0", skbaddr=0x72),
        _ev(1.000014, "net:net_dev_queue", name="eth0", skbaddr=0x71),  # its answer, at the freed address
        _ev(1.000016, "net:netif_rx", name="eth0", skbaddr=0x71),
    ]
    packets, kept = attribute(events, _scope())
    assert [len(p.events) for p in packets] == [2]  # the datagram ends at its merge
    assert Counter(n for e in kept for n in e.names())["net:netif_rx@eth0"] == 0


def _failed(ts: float, cpu: int, pid: int, queued: int) -> list[TraceEvent]:
    """A neighbour timer giving up: it purges its queue (NEIGH_FAILED, deviceless), then its tracepoint."""
    purge = [
        TraceEvent(ts + i * 1e-6, cpu, pid, "ksoftirqd", "skb", "kfree_skb",
                   {"skbaddr": 0x80 + 16 * cpu + i, "reason": "NEIGH_FAILED", "location": "neigh_invalidate+0x8"},
                   SOFTIRQ)
        for i in range(queued)
    ]
    timer = TraceEvent(ts + 0.00001, cpu, pid, "ksoftirqd", "neigh", "neigh_timer_handler",
                       {"dev": "eth0", "primary_key4": "10.0.8.99", "nud_state": "failed"}, SOFTIRQ)
    return [*purge, timer]


def test_a_failed_neighbour_is_never_vouched_through_a_look_alike_that_contradicts_the_namespaces_count() -> None:
    """The lab's own timer event left the vouch window (a late reader); the only candidate purged 3 skbs
    while the lab's node sent 1 host-unreachable: it is someone else's, and nothing is counted."""
    events = _failed(1.0, 0, 24, 1) + _failed(1.3, 1, 25, 3)
    scope = _scope([NeighNote("neigh", "eth0", "10.0.8.99", "FAILED", received=1.4)])
    scope.unreachable = {"client": 1}
    drops = [e for e in attribute(events, scope)[1] if e.key == "skb:kfree_skb"]
    assert drops == []
    scope.notes = {"client": [NeighNote("neigh", "eth0", "10.0.8.99", "FAILED", received=1.1)]}
    assert len([e for e in attribute(events, scope)[1] if e.key == "skb:kfree_skb"]) == 1  # in time: its own


def test_a_look_alike_in_another_state_before_it_does_not_hide_the_labs_failed_neighbour() -> None:
    """Another namespace's neighbour still probing (INCOMPLETE) came first: the FAILED one is still the lab's."""
    probing = TraceEvent(1.0, 1, 25, "ksoftirqd", "neigh", "neigh_timer_handler",
                         {"dev": "eth0", "primary_key4": "10.0.8.99", "nud_state": "incomplete"}, SOFTIRQ)
    scope = _scope([NeighNote("neigh", "eth0", "10.0.8.99", "FAILED", received=1.2)])
    scope.unreachable = {"client": 1}
    drops = [e for e in attribute([probing, *_failed(1.1, 0, 24, 1)], scope)[1] if e.key == "skb:kfree_skb"]
    assert len(drops) == 1


def _forwarded_into_an_eth0(receive_key: str) -> list[TraceEvent]:
    """Another namespace's router forwards a frame out of its eth1 to a peer that is, like the lab's, an eth0:
    the forward runs in softirq on CPU 0 while the lab's sender is current (net_rx_action serves every
    namespace's backlog), and the veth hands the skb to the peer in the same call."""
    return [
        _ev(1.0, "net:netif_receive_skb", name="eth2", skbaddr=0x71),
        _ev(1.000002, "net:net_dev_queue", name="eth1", skbaddr=0x71),
        _ev(1.000004, receive_key, name="eth0", skbaddr=0x71),  # only the name is the lab's
        _ev(1.000006, "net:netif_receive_skb", name="eth0", skbaddr=0x71),
        _ev(1.000008, "skb:consume_skb", skbaddr=0x71),
    ]


def _forwarded_through_the_backlog() -> list[TraceEvent]:
    """The same forward traced with net_dev_start_xmit and net_dev_xmit (tx-path's events): netif_rx runs
    inside the transmit, the foreign net_dev_xmit follows it, and the peer's netif_receive_skb comes later,
    when the backlog is served -- here after another skb's work, still in the lab task's softirq."""
    return [
        _ev(1.0, "net:net_dev_queue", name="eth1", skbaddr=0x73),
        _ev(1.000001, "net:net_dev_start_xmit", name="eth1", skbaddr=0x73),
        _ev(1.000002, "net:netif_rx", name="eth0", skbaddr=0x73),
        _ev(1.000003, "net:net_dev_xmit", name="eth1", skbaddr=0x73),
        _ev(1.000004, "skb:consume_skb", skbaddr=0x74),  # something else in between
        _ev(1.000006, "net:netif_receive_skb", name="eth0", skbaddr=0x73),
        _ev(1.000008, "skb:kfree_skb", skbaddr=0x73, reason="NO_SOCKET"),
    ]


def test_a_frame_forwarded_from_a_foreign_device_into_a_same_named_one_is_not_the_labs() -> None:
    """The chain is cut where the address moves from a device not named like the lab's to one that is (the
    names cannot tell two namespaces' eth0 apart); the receive right after the foreign transmit of the same
    address, on the same CPU, is that transmit's skb -- seen on a lab run beside tcp-connect and nat, where
    rx-gro's check counted one foreign datagram as its own netif_rx@eth0."""
    for receive in ("net:netif_rx", "net:napi_gro_receive_entry"):
        counts = _counts(_forwarded_into_an_eth0(receive), _scope())
        assert counts[f"{receive}@eth0"] == 0, receive
    counts = _counts(_forwarded_through_the_backlog(), _scope())
    assert counts["net:netif_rx@eth0"] == counts["net:netif_receive_skb@eth0"] == counts["skb:kfree_skb"] == 0
    own = [
        _ev(1.0, "net:net_dev_queue", PROCESS, name="eth0", skbaddr=0x72),  # the lab's own send: still its own
        _ev(1.000002, "net:netif_rx", name="eth0", skbaddr=0x72),
        _ev(1.000004, "skb:consume_skb", skbaddr=0x72),
    ]
    assert _counts(own, _scope())["net:netif_rx@eth0"] == 1


def test_what_a_lab_receive_causes_in_its_call_is_the_labs_across_frees_and_clones() -> None:
    """An ARP reply allocated where the request's shared copy was just freed, and a bridge flooding one lab frame
    to two ports (each clone's cause is the clone before it): all the lab's."""
    arp = [
        _ev(1.0, "net:net_dev_queue", PROCESS, name="eth0", skbaddr=0xA1),  # the lab's request
        _ev(1.000002, "net:netif_rx", PROCESS, name="eth0", skbaddr=0xA1),
        _ev(1.000010, "net:netif_receive_skb", name="eth0", skbaddr=0xA1),
        _ev(1.000012, "skb:consume_skb", skbaddr=0xA2),  # arp_rcv's copy
        _ev(1.000014, "net:net_dev_queue", name="eth0", skbaddr=0xA2),  # the reply, at that address
        _ev(1.000016, "net:netif_rx", name="eth0", skbaddr=0xA2),
        _ev(1.000018, "skb:consume_skb", skbaddr=0xA1),
    ]
    assert _counts(arp, _scope())["net:netif_rx@eth0"] == 2
    flood = [
        _ev(1.0, "net:net_dev_queue", PROCESS, name="eth0", skbaddr=0xB1),
        _ev(1.000002, "net:netif_rx", PROCESS, name="eth0", skbaddr=0xB1),
        _ev(1.000010, "net:netif_receive_skb", name="eth0", skbaddr=0xB1),  # on the bridge port
        _ev(1.000012, "net:net_dev_queue", name="eth0", skbaddr=0xB2),  # clone to the second port
        _ev(1.000014, "net:netif_rx", name="eth0", skbaddr=0xB2),
        _ev(1.000016, "net:net_dev_queue", name="eth0", skbaddr=0xB3),  # clone to the third
        _ev(1.000018, "net:netif_rx", name="eth0", skbaddr=0xB3),
        _ev(1.000020, "skb:consume_skb", skbaddr=0xB1),
    ]
    assert _counts(flood, _scope())["net:netif_rx@eth0"] == 3


def _timer_run(ts: float, *made: TraceEvent, action: str = "TIMER") -> list[TraceEvent]:
    """A timer vector's run on CPU 0 while the lab's sender is current: entry, what the timers made, exit."""
    vec = f"{1 if action == 'TIMER' else 8} [action={action}"
    return [_ev(ts, "irq:softirq_entry", vec=vec), *made, _ev(made[-1].timestamp + 1e-6, "irq:softirq_exit", vec=vec)]


def _retransmitted_syn(ts: float) -> list[TraceEvent]:
    """Another namespace's SYN, sent again by its retransmission timer out of its eth0 (the lab has one too)."""
    return [
        _ev(ts, "net:net_dev_queue", name="eth0", skbaddr=0x81),
        _ev(ts + 2e-6, "net:netif_rx", name="eth0", skbaddr=0x81),
    ]


def test_what_a_timer_made_in_the_lab_tasks_context_is_not_the_labs() -> None:
    """Seen with rx-gro beside tcp-connect (``run -j 6``): tcp-connect's SYN retransmission timer fired while
    rx-gro's sender was current, and the SYN counted as rx-gro's ``netif_rx@eth0``.  The timer vector's softirq
    entry and exit bracket it: whose timer it was, nothing in the skb says."""
    for action in ("TIMER", "HRTIMER"):
        counts = _counts(_timer_run(1.0, *_retransmitted_syn(1.000001), action=action), _scope())
        assert counts["net:netif_rx@eth0"] == 0, action
    # the same softirq work outside a timer's run (a NET_RX softirq, whose entries are not recorded): the lab's
    assert _counts(_retransmitted_syn(1.0), _scope())["net:netif_rx@eth0"] == 1
    after = [*_timer_run(1.0, _ev(1.000001, "neigh:neigh_update", dev="eth1")), *_retransmitted_syn(1.00001)]
    assert _counts(after, _scope())["net:netif_rx@eth0"] == 1  # the bracket ended at the exit
    # a trace that lost events may have lost an exit: brackets are not read, as before they were recorded
    lossy = _scope()
    lossy.lost = 3
    assert _counts(_timer_run(1.0, *_retransmitted_syn(1.000001)), lossy)["net:netif_rx@eth0"] == 1


def test_a_neighbour_probe_in_a_timer_run_is_still_the_labs_when_its_namespace_vouches() -> None:
    events = _timer_run(1.0, *_probe(1.000001))
    assert _counts(events, _scope())["net:netif_rx@eth0"] == 0
    note = NeighNote("neigh", "eth0", "10.0.4.2", "PROBE", received=1.0002)
    counts = _counts(events, _scope([note]))
    assert counts["net:netif_rx@eth0"] == 1
    assert counts["irq:softirq_entry"] == counts["irq:softirq_exit"] == 0  # marks of context, never lab events


def test_a_timers_transmit_at_the_address_of_a_lab_skb_it_never_received_is_not_that_skb() -> None:
    """Seen with rx-gro beside other labs: a lab datagram merged by GRO is freed untraced, and a skb another
    namespace's timer sent next reused its address -- the chain ran on into a foreign ``netif_rx@eth0``."""
    received = [
        _ev(1.0, "net:net_dev_queue", PROCESS, name="eth0", skbaddr=0x91),  # the lab's send
        _ev(1.000002, "net:napi_gro_receive_entry", name="eth0", skbaddr=0x91),
        _ev(1.000004, "net:netif_receive_skb", name="eth0", skbaddr=0x91),  # merged, then freed untraced
    ]
    later = [
        _ev(1.01, "net:net_dev_queue", name="eth0", skbaddr=0x91),  # another namespace's retransmission
        _ev(1.010002, "net:netif_rx", name="eth0", skbaddr=0x91),
    ]
    counts = _counts([*received, *_timer_run(1.009, *later)], _scope())
    assert counts["net:netif_receive_skb@eth0"] == 1  # the lab's own datagram is still its own
    assert counts["net:netif_rx@eth0"] == 0
    # outside a timer's run the same softirq transmit is still read as the skb sent on (a forward, a bridge)
    assert _counts([*received, *later], _scope())["net:netif_rx@eth0"] == 1


def test_a_vouched_probe_going_down_a_bridge_to_its_port_in_one_timer_run_stays_one_skb() -> None:
    """In one timer run the probe's skb is queued on br0 and then on the bridge port: the same skb going down a
    stack of devices, not a new one at the address -- a reviewer's case for the cut above."""
    probe = [
        _ev(1.000001, "net:net_dev_queue", name="br0", skbaddr=0x55),
        _ev(1.000002, "net:net_dev_queue", name="veth1", skbaddr=0x55),
        _ev(1.000003, "net:netif_rx", name="eth0", skbaddr=0x55),
        _ev(1.000004, "neigh:neigh_timer_handler", dev="br0", primary_key4="10.0.4.2", nud_state="probe"),
    ]
    note = NeighNote("neigh", "br0", "10.0.4.2", "PROBE", received=1.0002)
    scope = Scope({"br0", "veth1", "eth0"}, {LAB}, 0.5, 2.0, notes={"host": [note]})
    counts = _counts(_timer_run(1.0, *probe), scope)
    assert counts["net:net_dev_queue@veth1"] == counts["net:netif_rx@eth0"] == 1
