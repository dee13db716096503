"""Hook order as an ordered kernel trace (NFLOG + nfnetlink_log sequence numbers).

Routed topology::

    a (10.99.1.1) -- r (10.99.1.254 | 10.99.2.254, forwarding) -- b (10.99.2.1)

Bridged topology::

    h1 (10.99.3.1) -- p1 [br0 in br] p2 -- h2 (10.99.3.2)
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

from labctl.kernel import ebtables, iptables, netns, nflog, nftrace, sysctl
from labctl.kernel.nftrace import HookTracer
from tests.kernel.conftest import Topo

UDP = "-p udp --dport 5000"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# --------------------------------------------------------------------------
# pure parsing


def _nlmsg(kind: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 0, 0) + body


def test_parse_packet_message() -> None:
    attrs = (
        nflog._attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, 2))
        + nflog._attr(nflog.NFULA_PREFIX, b"lt1|ip|filter|FORWARD\0")
        + nflog._attr(nflog.NFULA_SEQ, struct.pack("!I", 41))
        + nflog._attr(nflog.NFULA_MARK, struct.pack("!I", 7))
        + nflog._attr(nflog.NFULA_IFINDEX_INDEV, struct.pack("!I", 3))
        + nflog._attr(nflog.NFULA_PAYLOAD, bytes.fromhex("450000200001") + bytes(14))
    )
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(9)) + attrs
    ack = _nlmsg(nflog.NLMSG_ERROR, struct.pack("=i", 0) + bytes(16))
    messages, errors = nflog.parse_datagram(_nlmsg(nflog.NFNL_SUBSYS_ULOG << 8, body) + ack)
    assert errors == [0]
    (msg,) = messages
    assert (msg.family, msg.hook, msg.prefix, msg.seq, msg.mark, msg.indev) == (
        socket.AF_INET,
        2,
        "lt1|ip|filter|FORWARD",
        41,
        7,
        3,
    )
    assert nftrace.hook_name(msg.hook) == "FORWARD"


def test_ebtables_match_translation() -> None:
    assert nftrace.ebtables_match("-p udp --dport 5000 -d 10.0.0.1") == (
        "-p IPv4 --ip-proto udp --ip-dport 5000 --ip-dst 10.0.0.1"
    )
    assert nftrace.ebtables_match("") == ""
    with pytest.raises(ValueError):
        nftrace.ebtables_match("-m mark --mark 1")


# --------------------------------------------------------------------------
# kernel


@pytest.fixture
def routed(topo: Topo, root_untouched: None) -> tuple[str, str, str]:
    return topo.routed()


def exchange(a: str, b: str, count: int = 1) -> int:
    """Send ``count`` datagrams a -> b:5000 from one socket; how many arrived."""
    with netns.entered(b):
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(a):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    arrived = 0
    with listener, sender:
        listener.bind(("10.99.2.1", 5000))
        listener.settimeout(0.5)
        for _ in range(count):
            sender.sendto(b"traced", ("10.99.2.1", 5000))
            try:
                listener.recv(100)
                arrived += 1
            except TimeoutError:
                pass
    return arrived


def names(tracer: HookTracer) -> list[str]:
    return [step.name for step in tracer.steps()]


@root_only
def test_local_delivery_order(routed: tuple[str, str, str]) -> None:
    a, _r, b = routed
    with HookTracer(b, match=UDP, conntrack=True) as tracer:
        assert exchange(a, b) == 1
    assert names(tracer) == [
        "ip:raw:PREROUTING",
        "ip:mangle:PREROUTING",
        "ip:nat:PREROUTING",
        "ip:mangle:INPUT",
        "ip:filter:INPUT",
        "ip:security:INPUT",  # security (prio 50) after filter
        "ip:nat:INPUT",  # nat INPUT (SNAT, prio 100) is last
    ]
    steps = tracer.steps()
    assert [s.seq for s in steps] == sorted(s.seq for s in steps)
    assert {s.ifin for s in steps} == {"eth0"}


@root_only
def test_forward_order(routed: tuple[str, str, str]) -> None:
    a, r, b = routed
    with HookTracer(r, match=UDP, conntrack=True) as tracer:
        assert exchange(a, b) == 1
    assert names(tracer) == [
        "ip:raw:PREROUTING",
        "ip:mangle:PREROUTING",
        "ip:nat:PREROUTING",
        "ip:mangle:FORWARD",
        "ip:filter:FORWARD",
        "ip:security:FORWARD",
        "ip:mangle:POSTROUTING",
        "ip:nat:POSTROUTING",
    ]
    forward = [s for s in tracer.steps() if s.chain == "FORWARD"]
    assert {(s.ifin, s.ifout) for s in forward} == {("eth0", "eth1")}


@root_only
def test_local_output_order(routed: tuple[str, str, str]) -> None:
    a, _r, b = routed
    with HookTracer(a, match=UDP, conntrack=True) as tracer:
        assert exchange(a, b) == 1
    assert names(tracer) == [
        "ip:raw:OUTPUT",
        "ip:mangle:OUTPUT",
        "ip:nat:OUTPUT",
        "ip:filter:OUTPUT",
        "ip:security:OUTPUT",
        "ip:mangle:POSTROUTING",
        "ip:nat:POSTROUTING",
    ]


@root_only
def test_nat_sees_only_the_first_packet_of_a_flow(routed: tuple[str, str, str]) -> None:
    a, r, b = routed
    with HookTracer(r, match=UDP, conntrack=True) as tracer:
        assert exchange(a, b, count=3) == 3
    per_chain = [s.name for s in tracer.steps()]
    assert per_chain.count("ip:filter:FORWARD") == 3
    assert per_chain.count("ip:nat:PREROUTING") == 1
    assert per_chain.count("ip:nat:POSTROUTING") == 1


@root_only
def test_without_conntrack_nat_chains_never_run(routed: tuple[str, str, str]) -> None:
    a, _r, b = routed
    with HookTracer(b, match=UDP) as tracer:
        assert exchange(a, b) == 1
    assert names(tracer) == [
        "ip:raw:PREROUTING",
        "ip:mangle:PREROUTING",
        "ip:mangle:INPUT",
        "ip:filter:INPUT",
        "ip:security:INPUT",
    ]


@root_only
def test_drop_ends_the_packet_accept_ends_only_the_table(routed: tuple[str, str, str]) -> None:
    a, _r, b = routed
    iptables.apply_rules(b, [f"-t mangle -A INPUT {UDP} -j ACCEPT", f"-A INPUT {UDP} -j DROP"])
    with HookTracer(b, match=UDP, conntrack=True) as tracer:
        assert exchange(a, b) == 0
    # ACCEPT in mangle INPUT did not stop filter INPUT; DROP there stopped nat INPUT
    assert names(tracer)[-2:] == ["ip:mangle:INPUT", "ip:filter:INPUT"]


@root_only
def test_mark_from_mangle_is_seen_later_not_earlier(routed: tuple[str, str, str]) -> None:
    a, r, b = routed
    iptables.apply_rules(r, ["-t mangle -A PREROUTING -p udp -j MARK --set-mark 7"])
    with HookTracer(r, match=UDP) as tracer:
        assert exchange(a, b) == 1
    marks = {s.name: s.mark for s in tracer.steps()}
    assert marks["ip:raw:PREROUTING"] == 0
    assert marks["ip:mangle:PREROUTING"] == 0  # the trace rule runs before the MARK rule
    assert marks["ip:filter:FORWARD"] == 7


@root_only
def test_trace_rules_are_removed_and_counters_kept(routed: tuple[str, str, str]) -> None:
    a, r, b = routed
    iptables.apply_rules(r, [f"-A FORWARD {UDP} -j ACCEPT"])
    assert exchange(a, b) == 1
    before = [x.rule for x in iptables.list_rules(r) if x.position]
    with HookTracer(r, match=UDP, bridge_tables=("filter",)) as tracer:
        assert exchange(a, b) == 1
        assert any(tracer.tag in x.rule for x in iptables.list_rules(r))
    # tables the trace needed stay instantiated (legacy xtables), but empty again
    assert [x.rule for x in iptables.list_rules(r) if x.position] == before
    forward = [x for x in iptables.list_rules(r, ["filter"]) if x.chain == "FORWARD" and x.position]
    assert [x.packets for x in forward] == [2]
    assert ebtables.existing_tables(r) == []  # the bridge table only the tracer made is gone


@root_only
@pytest.mark.usefixtures("root_untouched")
def test_bridged_order_with_br_netfilter(topo: Topo) -> None:
    h1, br, h2 = topo.namespaces("h1", "br", "h2")
    topo.veth(h1, "eth0", br, "p1", "10.99.3.1/24")
    topo.veth(h2, "eth0", br, "p2", "10.99.3.2/24")
    topo.bridge(br, "br0", ["p1", "p2"])
    sysctl.write_many({"net.bridge.bridge-nf-call-iptables": "1"}, br)
    with HookTracer(br, match=UDP, bridge_tables=("nat", "filter"), conntrack=True) as tracer:
        with netns.entered(h2):
            listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns.entered(h1):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with listener, sender:
            listener.bind(("10.99.3.2", 5000))
            listener.settimeout(2.0)
            sender.sendto(b"bridged", ("10.99.3.2", 5000))
            assert listener.recv(100) == b"bridged"
    assert names(tracer) == [
        "bridge:nat:PREROUTING",
        "ip:raw:PREROUTING",
        "ip:mangle:PREROUTING",
        "ip:nat:PREROUTING",
        "bridge:filter:FORWARD",
        "ip:mangle:FORWARD",
        "ip:filter:FORWARD",
        "ip:security:FORWARD",
        "bridge:nat:POSTROUTING",
        "ip:mangle:POSTROUTING",
        "ip:nat:POSTROUTING",
    ]
    steps = tracer.steps()
    assert {(s.ifin, s.physin) for s in steps if s.chain == "PREROUTING"} == {("br0", "p1")}
    assert {s.physout for s in steps if s.chain == "POSTROUTING"} == {"p2"}
    assert ebtables.existing_tables(br) == []
