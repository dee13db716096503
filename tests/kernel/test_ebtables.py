"""ebtables (ebtables-nft) and br_netfilter on the real kernel (run as root).

Topology::

    h1 (10.99.3.1, 02:00:00:00:00:01) --eth0/p1-- br[br0] --p2/eth0-- h2 (10.99.3.2)

br0 itself gets 10.99.3.254 where a test needs the bridge to route.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from labctl.kernel import ebtables, iptables, netns, sysctl
from labctl.kernel.iptables import RuleError
from tests.kernel.conftest import Topo

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.usefixtures("root_untouched"),
]

H1_MAC = "02:00:00:00:00:01"
IP_RECVTTL = 12  # linux/in.h; not exported by the socket module
NOT_DELIVERED_WAIT = 0.3


class Bridged:
    """h1 -- br0 -- h2, each in its own namespace of ``topo``."""

    def __init__(self, topo: Topo) -> None:
        self.topo = topo
        self.h1, self.br, self.h2 = topo.namespaces("h1", "br", "h2")
        topo.veth(self.h1, "eth0", self.br, "p1", "10.99.3.1/24", mac_a=H1_MAC)
        topo.veth(self.h2, "eth0", self.br, "p2", "10.99.3.2/24", mac_a="02:00:00:00:00:02")
        topo.bridge(self.br, "br0", ["p1", "p2"])

    def send(self, payload: bytes) -> None:
        with netns.entered(self.h1):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.sendto(payload, ("10.99.3.2", 5000))


@pytest.fixture
def net(topo: Topo) -> Bridged:
    return Bridged(topo)


@pytest.fixture
def listener(net: Bridged) -> Iterator[socket.socket]:
    with netns.entered(net.h2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("10.99.3.2", 5000))
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    with sock:
        yield sock


def receive(sock: socket.socket, wait: float = 2.0) -> tuple[bytes, int] | None:
    """Payload and the TTL it arrived with, or None."""
    sock.settimeout(wait)
    try:
        data, ancillary, _flags, _peer = sock.recvmsg(2048, 64)
    except TimeoutError:
        return None
    ttl = next(int.from_bytes(d, "little") for _level, kind, d in ancillary if kind == socket.IP_TTL)
    return data, ttl


def eb_counter(ns: str, table: str, chain: str, needle: str) -> int:
    rows = [r for r in ebtables.list_rules(ns) if (r.table, r.chain) == (table, chain) and needle in r.rule]
    assert len(rows) == 1, rows
    return rows[0].packets


def test_filter_drops_by_mac(net: Bridged, listener: socket.socket) -> None:
    net.send(b"before")
    assert receive(listener) == (b"before", 64)  # bridged: TTL untouched
    ebtables.apply_rules(net.br, [f"-t filter -A FORWARD -s {H1_MAC} -j DROP"])
    net.send(b"after")
    assert receive(listener, NOT_DELIVERED_WAIT) is None
    assert eb_counter(net.br, "filter", "FORWARD", H1_MAC) == 1
    nft = netns.run(net.br, ["nft", "list", "table", "bridge", "filter"], capture_output=True, text=True)
    assert f"ether saddr {H1_MAC}" in nft.stdout  # stored as nf_tables


def test_policy_and_listing(net: Bridged) -> None:
    ebtables.apply_rules(net.br, ["-P FORWARD DROP", "-N LAB", "-A LAB -j ACCEPT", "-A FORWARD -j LAB"])
    rows = ebtables.list_rules(net.br)
    policies = {(r.chain, r.policy) for r in rows if r.position == 0}
    assert {("FORWARD", "DROP"), ("LAB", "RETURN")} <= policies
    assert [(r.chain, r.rule) for r in rows if r.position] == [
        ("FORWARD", "-A FORWARD -j LAB"),
        ("LAB", "-A LAB -j ACCEPT"),
    ]


def test_bad_rule_leaves_nothing_behind(net: Bridged) -> None:
    ebtables.apply_rules(net.br, ["-A FORWARD -s 02:00:00:00:00:09 -j DROP"])
    before = ebtables.list_rules(net.br)
    batch = ["-A FORWARD -j ACCEPT", "-t nat -A PREROUTING -j ACCEPT", "-A FORWARD -j NOSUCHCHAIN"]
    with pytest.raises(RuleError) as info:
        ebtables.apply_rules(net.br, batch)
    assert info.value.rule == "-A FORWARD -j NOSUCHCHAIN"
    assert info.value.namespace == net.br
    assert ebtables.list_rules(net.br) == before
    assert ebtables.existing_tables(net.br) == ["filter"]  # no nat table either


def test_converge_keeps_counters_of_unchanged_rules(net: Bridged, listener: socket.socket) -> None:
    rules = ["-N LAB", "-A LAB -j ACCEPT", f"-A FORWARD -s {H1_MAC} -j LAB"]
    assert ebtables.converge(net.br, rules) == "loaded"
    net.send(b"counted")
    assert receive(listener) is not None
    counted = eb_counter(net.br, "filter", "FORWARD", H1_MAC)
    assert counted >= 1  # the datagram (and h1's ARP request)
    assert ebtables.converge(net.br, rules) is None  # compared, not flushed: the counter stays
    assert eb_counter(net.br, "filter", "FORWARD", H1_MAC) == counted
    assert ebtables.converge(net.br, [*rules, "-P FORWARD DROP"]) == "replaced"  # a policy is a difference
    with pytest.raises(RuleError) as info:  # refused in the scratch namespace: the node's rules stay whole
        ebtables.converge(net.br, ["-A FORWARD -j NOSUCHCHAIN"])
    assert info.value.rule == "-A FORWARD -j NOSUCHCHAIN" and info.value.namespace == net.br
    assert {(r.chain, r.policy) for r in ebtables.list_rules(net.br) if r.position == 0} >= {("FORWARD", "DROP")}
    assert ebtables.converge(net.br, []) == "removed"
    assert ebtables.existing_tables(net.br) == [] and ebtables.converge(net.br, []) is None


def test_broute_is_not_available_here(net: Bridged) -> None:
    with pytest.raises(RuleError, match="broute is not available"):
        ebtables.apply_rules(net.br, ["-t broute -A BROUTING -p ipv4 -j DROP"])
    # the tool agrees: ebtables-nft 1.8.9 has no broute table on this system
    result = ebtables.run(net.br, ["-t", "broute", "-L"])
    assert result.returncode != 0 and "broute" in result.stderr


def test_redirect_routes_instead_of_bridging(net: Bridged, listener: socket.socket) -> None:
    """What broute would show, done with ebtables nat ``redirect``.

    ebtables-nft turns ``-j redirect`` into ``meta pkttype set host``: the bridge
    passes the frame up through br0, the IP stack routes it (TTL 64 -> 63) and
    sends it back out br0 -- ebtables FORWARD never sees it.
    """
    net.topo.address(net.br, "br0", "10.99.3.254/24")
    sysctl.write_many(
        {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.send_redirects": "0",
            "net.ipv4.conf.br0.send_redirects": "0",
            "net.bridge.bridge-nf-call-iptables": "0",
        },
        net.br,
    )
    ebtables.apply_rules(
        net.br,
        ["-t nat -A PREROUTING -p ipv4 --ip-proto udp -j redirect", "-A FORWARD -p ipv4 -j ACCEPT"],
    )
    iptables.apply_rules(net.br, ["-A FORWARD -i br0 -o br0 -p udp --dport 5000 -j ACCEPT"])
    net.send(b"routed")
    assert receive(listener) == (b"routed", 63)
    assert eb_counter(net.br, "nat", "PREROUTING", "redirect") == 1
    assert eb_counter(net.br, "filter", "FORWARD", "IPv4") == 0
    rows = iptables.list_rules(net.br, ["filter"])
    assert [r.packets for r in rows if r.chain == "FORWARD" and r.position] == [1]


@pytest.mark.parametrize(("call_iptables", "seen"), [("1", 1), ("0", 0)])
def test_br_netfilter_lets_iptables_see_bridged_traffic(
    net: Bridged, listener: socket.socket, call_iptables: str, seen: int
) -> None:
    # br_netfilter is built into this kernel (no modules); the switch is per namespace
    sysctl.write_many({"net.bridge.bridge-nf-call-iptables": call_iptables}, net.br)
    iptables.apply_rules(net.br, ["-A FORWARD -m physdev --physdev-in p1 --physdev-out p2 -j ACCEPT"])
    net.send(b"bridged")
    assert receive(listener) == (b"bridged", 64)
    rows = [r for r in iptables.list_rules(net.br, ["filter"]) if r.chain == "FORWARD" and r.position]
    assert [r.packets for r in rows] == [seen]
