"""iptables rules on the real kernel, inside throw-away namespaces (run as root).

Topology (built per test, only what it needs)::

    a (10.99.1.1) --eth0/eth0-- r (10.99.1.254 | 10.99.2.254) --eth1/eth0-- b (10.99.2.1)

Every test ends by checking the root namespace's firewall is untouched.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import iptc
import pytest

from labctl.kernel import conntrack, iptables, netns
from labctl.kernel.iptables import RuleError
from tests.kernel.conftest import Topo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NOT_DELIVERED_WAIT = 0.3


@pytest.fixture(autouse=True, scope="module")
def iptc_cache_unused(root_untouched: None) -> Iterator[None]:
    """Nothing here may change the root namespace's firewall or python-iptables' global cache."""
    yield
    assert iptc.Table._cache == {}, "python-iptables' global (namespace-blind) tables were used"


def udp_socket(ns: str, bind: tuple[str, int] | None = None) -> socket.socket:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    if bind:
        sock.bind(bind)
    return sock


def received(sock: socket.socket, wait: float) -> tuple[bytes, tuple[str, int]] | None:
    sock.settimeout(wait)
    try:
        data, peer = sock.recvfrom(2048)
        return data, peer
    except TimeoutError:
        return None


def counter(ns: str, table: str, chain: str, needle: str) -> int:
    rows = [r for r in iptables.list_rules(ns, [table]) if r.chain == chain and r.position and needle in r.rule]
    assert len(rows) == 1, rows
    return rows[0].packets


# --------------------------------------------------------------------------
# tests


def test_input_drop_is_counted_and_not_delivered(topo: Topo) -> None:
    a, _r, b = topo.routed()
    iptables.apply_rules(b, ["-A INPUT -p udp --dport 5000 -j DROP"])
    listener = udp_socket(b, ("10.99.2.1", 5000))
    with udp_socket(a) as sender:
        sender.sendto(b"dropped", ("10.99.2.1", 5000))
    assert received(listener, NOT_DELIVERED_WAIT) is None
    assert counter(b, "filter", "INPUT", "--dport 5000") == 1
    listener.close()


def test_forward_counter_on_router(topo: Topo) -> None:
    a, r, b = topo.routed()
    iptables.apply_rules(r, ["-A FORWARD -i eth0 -o eth1 -p udp --dport 5000 -j ACCEPT"])
    listener = udp_socket(b, ("10.99.2.1", 5000))
    with udp_socket(a) as sender:
        for _ in range(3):
            sender.sendto(b"fwd", ("10.99.2.1", 5000))
            assert received(listener, 2.0) is not None
    assert counter(r, "filter", "FORWARD", "--dport 5000") == 3
    listener.close()


def test_output_drop_fails_the_send_with_eperm(topo: Topo) -> None:
    a, _r, _b = topo.routed()
    iptables.apply_rules(a, ["-A OUTPUT -p udp --dport 5000 -j DROP"])
    with udp_socket(a) as sender, pytest.raises(PermissionError) as info:
        sender.sendto(b"never", ("10.99.2.1", 5000))
    assert info.value.errno == errno.EPERM
    assert counter(a, "filter", "OUTPUT", "--dport 5000") == 1


def test_masquerade_rewrites_source_and_is_tracked(topo: Topo) -> None:
    a, r, b = topo.routed()
    iptables.apply_rules(r, ["-t nat -A POSTROUTING -o eth1 -j MASQUERADE"])
    listener = udp_socket(b, ("10.99.2.1", 5000))
    with udp_socket(a, ("10.99.1.1", 0)) as sender:
        sport = sender.getsockname()[1]
        sender.sendto(b"natted", ("10.99.2.1", 5000))
        got = received(listener, 2.0)
        assert got is not None
        _data, peer = got
        assert peer[0] == "10.99.2.254"  # the far side sees the router, not 10.99.1.1
        listener.sendto(b"reply", peer)  # ... and its reply is de-NATed back to a
        assert received(sender, 2.0) == (b"reply", ("10.99.2.1", 5000))
    (entry,) = conntrack.find(r, "udp", dst="10.99.2.1", dport=5000)
    assert (entry.orig.src, entry.orig.sport) == ("10.99.1.1", sport)
    assert entry.reply.dst == "10.99.2.254" and entry.snat
    assert counter(r, "nat", "POSTROUTING", "MASQUERADE") == 1
    listener.close()


def test_a_nat_table_alone_does_not_track(topo: Topo) -> None:
    """Conntrack runs in a namespace only once a rule needs it (here: -m conntrack)."""
    a, r, b = topo.routed()
    iptables.apply_rules(r, ["-t nat -A POSTROUTING -j ACCEPT"])
    listener = udp_socket(b, ("10.99.2.1", 5000))
    with udp_socket(a) as sender:
        sender.sendto(b"untracked", ("10.99.2.1", 5000))
        assert received(listener, 2.0) is not None
        assert conntrack.entries(r) == []
        assert counter(r, "nat", "POSTROUTING", "ACCEPT") == 0  # nat chains skip untracked packets
        iptables.apply_rules(r, ["-A FORWARD -m conntrack --ctstate NEW"])
        sender.sendto(b"tracked", ("10.99.2.1", 5000))
        assert received(listener, 2.0) is not None
    assert [e.orig.dport for e in conntrack.entries(r)] == [5000]
    assert counter(r, "nat", "POSTROUTING", "ACCEPT") == 1
    listener.close()


def test_legacy_backend_shows_the_rules(topo: Topo) -> None:
    ns = topo.node("n")
    iptables.apply_rules(ns, ["-A INPUT -p udp --dport 5000 -j DROP", "-P FORWARD DROP"])
    legacy = netns.run(ns, ["iptables-legacy-save"], capture_output=True, text=True, check=True)
    assert "-A INPUT -p udp -m udp --dport 5000 -j DROP" in legacy.stdout
    assert ":FORWARD DROP" in legacy.stdout
    nft = netns.run(ns, ["iptables-nft-save"], capture_output=True, text=True)
    assert "--dport 5000" not in nft.stdout  # the nft backend does not see legacy tables
    rows = iptables.list_rules(ns)
    assert [(r.chain, r.policy) for r in rows if r.policy] == [
        ("INPUT", "ACCEPT"),
        ("FORWARD", "DROP"),
        ("OUTPUT", "ACCEPT"),
    ]
    assert [r.rule for r in rows if r.position] == ["-A INPUT -p udp -m udp --dport 5000 -j DROP"]


def test_user_chains_insert_and_listing_text(topo: Topo) -> None:
    ns = topo.node("n")
    iptables.apply_rules(
        ns,
        [
            "-N LAB",
            "-A LAB ! -s 10.99.0.0/16 -j DROP",
            "-A INPUT -j LAB",
            "-I INPUT 1 -i lo -j ACCEPT",
            "-t mangle -A PREROUTING -j MARK --set-mark 7",
            "-t raw -A PREROUTING -m mark --mark 7 -j ACCEPT",
        ],
    )
    rules = {(r.table, r.chain, r.position): r.rule for r in iptables.list_rules(ns) if r.position}
    assert rules[("filter", "INPUT", 1)] == "-A INPUT -i lo -j ACCEPT"
    assert rules[("filter", "INPUT", 2)] == "-A INPUT -j LAB"
    assert rules[("filter", "LAB", 1)] == "-A LAB ! -s 10.99.0.0/16 -j DROP"
    assert rules[("mangle", "PREROUTING", 1)] == "-A PREROUTING -j MARK --set-xmark 0x7/0xffffffff"
    assert rules[("raw", "PREROUTING", 1)] == "-A PREROUTING -m mark --mark 0x7 -j ACCEPT"


def _all_rules(ns: str) -> list[str]:
    return [f"{r.table} {r.rule}" for r in iptables.list_rules(ns)]


@pytest.mark.parametrize(
    "batch",
    [
        ["-A INPUT -j ACCEPT", "-A INPUT -p udp --dport x -j DROP"],  # library refuses
        ["-A INPUT -j ACCEPT", "-A NOCHAIN -j DROP"],  # no such chain
        # the kernel refuses filter after nat was committed: nat must be rolled back
        ["-t nat -A POSTROUTING -o eth1 -j MASQUERADE", "-A INPUT -j ACCEPT", "-A INPUT -j MASQUERADE"],
        ["-N NEW", "-A NEW -j ACCEPT", "-P INPUT DROP", "-A INPUT -j DNAT --to-destination 1.2.3.4"],
    ],
)
def test_bad_rule_leaves_nothing_behind(topo: Topo, batch: list[str]) -> None:
    ns = topo.node("n")
    iptables.apply_rules(ns, ["-t nat -A PREROUTING -j ACCEPT", "-A OUTPUT -j ACCEPT"])
    before = _all_rules(ns)
    with pytest.raises(RuleError) as info:
        iptables.apply_rules(ns, batch)
    assert info.value.namespace == ns
    assert info.value.rule == batch[-1]  # the culprit is named, even for kernel refusals
    assert _all_rules(ns) == before


def test_flush_empties_tables(topo: Topo) -> None:
    ns = topo.node("n")
    iptables.apply_rules(ns, ["-N X", "-A X -j RETURN", "-A INPUT -j X", "-P INPUT DROP"])
    iptables.flush(ns)
    rows = iptables.list_rules(ns)
    assert [r for r in rows if r.position] == []
    assert {r.policy for r in rows} == {"ACCEPT"}


_AFTER_NFT = """
from labctl.kernel import iptables, nft
from labctl.kernel.iptrules import RuleError
iptables.build_rule(iptables.parse_rule("-A INPUT -p udp --dport 53"))  # python-iptables' xtables first
nft.canonical("table inet t {\\n chain c {\\n counter\\n }\\n}\\n")  # then libnftables, which takes xt_params
try:
    iptables.build_rule(iptables.parse_rule("-A INPUT -p udp --dport x"))
except RuleError as exc:
    print("RuleError:", exc)
"""


def test_a_bad_option_after_libnftables_is_a_rule_error_not_an_exit() -> None:
    """libnftables points libxtables' exit handler at nft's, which exit(2)s: a bad ``--dport`` after any nft
    work (up's nftables converge, then a check's setup.iptables) killed labctl with no rollback."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _AFTER_NFT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "RuleError: match udp refused --dport" in result.stdout
