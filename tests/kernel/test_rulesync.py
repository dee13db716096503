"""A changed rule set is swapped in without opening the firewall: a DROP both versions share drops every
datagram sent while iptables (and ebtables, for the same reason) replace the rest.  Real kernel, as root.

A flush followed by a re-apply lets datagrams through in between (the old ``up`` did); the swap commits
each table whole (IPT_SO_SET_REPLACE / one nf_tables transaction).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from labctl.kernel import ebtables, iptables, netns
from tests.kernel.conftest import Topo

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.usefixtures("root_untouched"),
]

PORT = 5711
ROUNDS = 20


def _flood(ns: str, stop: threading.Event, sent: list[int]) -> None:
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        while not stop.is_set():
            sock.sendto(b"x", ("127.0.0.1", PORT))
            sent[0] += 1


def test_iptables_replaced_under_traffic_never_lets_a_dropped_datagram_through(topo: Topo) -> None:
    ns = topo.node("a")
    with netns.entered(ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", PORT))
    listener.setblocking(False)
    shared = [f"-A INPUT -p udp --dport {PORT} -j DROP", "-t nat -A OUTPUT -p tcp"]
    versions = [[*shared, "-A INPUT -p tcp"], [*shared, "-A INPUT -p icmp"]]
    iptables.converge(ns, versions[0])
    stop, sent = threading.Event(), [0]
    flood = threading.Thread(target=_flood, args=(ns, stop, sent))
    flood.start()
    try:
        time.sleep(0.05)
        for i in range(1, ROUNDS + 1):
            assert iptables.converge(ns, versions[i % 2]) == "replaced"
    finally:
        stop.set()
        flood.join()
    with listener:
        try:
            leaked = listener.recv(16)
        except BlockingIOError:
            leaked = None
    assert sent[0] > 20 and leaked is None, f"a datagram got through while the rules were replaced ({sent[0]} sent)"


def test_ebtables_replace_swaps_the_tables_it_names_and_empties_the_others(topo: Topo) -> None:
    ns = topo.node("sw")
    ebtables.apply_rules(ns, ["-N LAB", "-A LAB -j ACCEPT", "-A FORWARD -j LAB", "-P FORWARD DROP",
                              "-t nat -A PREROUTING -p ARP"])
    assert ebtables.converge(ns, ["-N LAB", "-A LAB -p IPv4 -j ACCEPT", "-A INPUT -j LAB"]) == "replaced"
    rows = ebtables.list_rules(ns)
    assert [(r.table, r.rule) for r in rows if r.position] == [
        ("filter", "-A INPUT -j LAB"),
        ("filter", "-A LAB -p IPv4 -j ACCEPT"),
    ]
    assert ("FORWARD", "ACCEPT") in {(r.chain, r.policy) for r in rows if r.position == 0}  # policy reset too
