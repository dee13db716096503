"""ip6tables rules on the real kernel, inside throw-away namespaces (run as root).

Traffic goes over the namespace's own loopback (::1): a datagram to ::1 passes
OUTPUT, POSTROUTING, then PREROUTING and INPUT of the same namespace.  Every
test ends with the root namespace's firewall and python-iptables' global
Table6 cache untouched.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator

import iptc
import pytest

from labctl.kernel import iptables, netns
from labctl.kernel.iptables import RuleError
from labctl.kernel.links import LinkAttrs, NodeLinks
from labctl.kernel.nftrace import HookTracer
from labctl.kernel.sysctl import write_here

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

_names = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def iptc_cache_unused(root_untouched: None) -> Iterator[None]:
    yield
    assert iptc.Table6._cache == {} and iptc.Table._cache == {}, "python-iptables' global tables were used"


@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace with IPv6 on and lo up."""
    name = netns.namespace_name(f"t{os.getpid()}i6", str(next(_names)))
    netns.create(name)
    try:
        with netns.entered(name):
            write_here({"net.ipv6.conf.all.disable_ipv6": "0", "net.ipv6.conf.lo.disable_ipv6": "0"})
        with NodeLinks(name) as links:
            links.refresh({"lo"})
            links.configure("lo", LinkAttrs())
        yield name
    finally:
        netns.remove(name)


def send_udp6(ns: str, port: int, listen: bool = True) -> bytes | None:
    """One datagram to [::1]:port inside ``ns``; what a listener there read (None: nothing)."""
    with netns.entered(ns):
        rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("::1", port))
        rx.settimeout(0.3)
        tx.sendto(b"ip6", ("::1", port))
        try:
            return rx.recv(64)
        except TimeoutError:
            return None


def user_rows(ns: str) -> list[tuple[str, str, int, str]]:
    return [(r.table, r.chain, r.position, r.rule) for r in iptables.list_rules(ns, family="ip6") if r.position]


def test_input_drop_is_counted_and_ipv4_tables_stay_absent(ns: str) -> None:
    iptables.apply_rules(ns, ["-A INPUT -p udp --dport 5601 -j DROP", "-A INPUT -p udp --dport 5602"], "ip6")
    assert send_udp6(ns, 5601) is None
    assert send_udp6(ns, 5602) == b"ip6"
    counts = {r.rule: r.packets for r in iptables.list_rules(ns, family="ip6") if r.position}
    assert counts == {"-A INPUT -p udp -m udp --dport 5601 -j DROP": 1, "-A INPUT -p udp -m udp --dport 5602": 1}
    assert iptables.existing_tables(ns, "ip6") == ["filter"] and iptables.existing_tables(ns) == []


def test_a_batch_is_all_or_nothing(ns: str) -> None:
    iptables.apply_rules(ns, ["-t raw -A PREROUTING -p udp"], "ip6")
    with pytest.raises(RuleError, match="no chain nowhere"):
        iptables.apply_rules(ns, ["-t raw -A OUTPUT -p udp", "-A nowhere -j DROP"], "ip6")
    with pytest.raises(RuleError, match="bad value"):
        iptables.apply_rules(ns, ["-A INPUT -j ACCEPT", "-A INPUT -d 10.0.0.1 -j DROP"], "ip6")
    assert user_rows(ns) == [("raw", "PREROUTING", 1, "-A PREROUTING -p udp")]


def test_converge_keeps_counters_of_unchanged_rules(ns: str) -> None:
    rules = ["-A INPUT -p udp --dport 5603", "-N seen", "-A OUTPUT -p udp -j seen"]
    assert iptables.converge(ns, rules, "ip6") == "loaded"  # no table yet: just applied
    send_udp6(ns, 5603)
    assert iptables.converge(ns, rules, "ip6") is None
    assert [r.packets for r in iptables.list_rules(ns, ["filter"], "ip6") if r.chain == "INPUT" and r.position] == [1]
    assert iptables.converge(ns, rules[:1], "ip6") == "replaced"
    assert user_rows(ns) == [("filter", "INPUT", 1, "-A INPUT -p udp -m udp --dport 5603")]
    assert iptables.converge(ns, [], "ip6") == "removed"
    assert user_rows(ns) == [] and iptables.converge(ns, [], "ip6") is None


def test_delete_where_and_flush_touch_one_family(ns: str) -> None:
    iptables.apply_rules(ns, ['-A INPUT -m comment --comment "tag|x"'], "ip")
    iptables.apply_rules(ns, ['-A INPUT -m comment --comment "tag|x"', "-P FORWARD DROP"], "ip6")
    assert iptables.delete_where(ns, lambda text: "tag|" in text, "ip6") == 1
    assert len([r for r in iptables.list_rules(ns) if r.position]) == 1  # the IPv4 rule stays
    iptables.flush(ns, "ip6")
    assert {r.policy for r in iptables.list_rules(ns, family="ip6")} == {"ACCEPT"}
    assert len([r for r in iptables.list_rules(ns) if r.position]) == 1


def test_the_tracer_walks_an_ipv6_datagram_in_kernel_order(ns: str) -> None:
    iptables.apply_rules(ns, ["-A INPUT -p udp --dport 5604"], "ip6")
    with HookTracer(ns, tables=(), tables6=("raw", "mangle", "filter"), match="-p udp --dport 5604") as tracer:
        assert send_udp6(ns, 5604) == b"ip6"
    steps = tracer.steps()
    assert [s.name for s in steps] == [
        "ip6:raw:OUTPUT",
        "ip6:mangle:OUTPUT",
        "ip6:filter:OUTPUT",
        "ip6:mangle:POSTROUTING",
        "ip6:raw:PREROUTING",
        "ip6:mangle:PREROUTING",
        "ip6:mangle:INPUT",
        "ip6:filter:INPUT",
    ]
    assert {(s.src, s.dst, s.ip_id) for s in steps} == {("::1", "::1", None)}
    assert len({s.flow for s in steps}) == 1  # one packet, one flow label at every hook
    assert user_rows(ns) == [("filter", "INPUT", 1, "-A INPUT -p udp -m udp --dport 5604")]  # trace rules gone
    assert iptables.existing_tables(ns) == []  # the IPv4 tables were not traced, so not instantiated


def test_converge_to_rules_the_kernel_refuses_names_the_rule_and_keeps_the_old(ns: str) -> None:
    iptables.apply_rules(ns, ["-A INPUT -p udp"], "ip6")
    with pytest.raises(RuleError, match="kernel refused the rule") as refused:
        iptables.converge(ns, ["-A INPUT -p tcp", "-t raw -A PREROUTING -j REJECT"], "ip6")  # REJECT: filter only
    assert refused.value.rule == "-t raw -A PREROUTING -j REJECT" and refused.value.namespace == ns
    assert user_rows(ns) == [("filter", "INPUT", 1, "-A INPUT -p udp")]  # the node's rules stay whole
    assert not [n for n in netns.list_all() if f"ebdiag{os.getpid()}." in n]  # our scratch namespaces are gone
