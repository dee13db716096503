"""Counter snapshots and deltas, on the real kernel (root, own namespaces only)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from labctl.kernel import counters, netns
from tests.kernel.conftest import Topo, VethPair

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

CLOSED_PORT = 9
T = TypeVar("T")


def _eventually(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 2.0) -> T:
    """Poll ``read`` until ``done``: under load, softirqs run later in ksoftirqd, not in sendto()."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.005)
        value = read()
    return value


class Pair(VethPair):
    """Two namespaces joined by a veth pair: ``a`` (10.78.0.1) ↔ ``b`` (10.78.0.2)."""

    def send(self, count: int = 1, size: int = 32, port: int = CLOSED_PORT) -> None:
        self.send_to_b(b"c" * size, count, port)


@pytest.fixture
def pair(topo: Topo) -> Pair:
    return topo.pair(Pair, "c", "10.78.0.1", "10.78.0.2")


def _tiny_tbf(pair: Pair) -> None:
    """A token bucket that holds ~2 packets, on the sender's device."""
    with netns.netlink(pair.ns_a) as ipr:
        index = ipr.link_lookup(ifname=pair.dev_a)[0]
        ipr.tc("add", "tbf", index=index, handle="1:", rate="8kbit", burst=1600, limit=2000)


def test_snmp_is_read_in_the_namespace(pair: Pair) -> None:
    before_a, before_b = counters.snmp(pair.ns_a), counters.snmp(pair.ns_b)
    pair.send()
    after_b = _eventually(lambda: counters.snmp(pair.ns_b), lambda c: c["Udp.NoPorts"] > before_b["Udp.NoPorts"])
    after_a = counters.snmp(pair.ns_a)
    assert after_b["Udp.NoPorts"] - before_b["Udp.NoPorts"] == 1
    assert after_a["Udp.NoPorts"] == before_a["Udp.NoPorts"]
    assert after_a["Udp.OutDatagrams"] - before_a["Udp.OutDatagrams"] == 1
    for key in ("Ip.ForwDatagrams", "Ip.InAddrErrors", "Ip.FragCreates", "Udp.RcvbufErrors"):
        assert key in after_b
    assert any(k.startswith("TcpExt.") for k in after_b) and any(k.startswith("IpExt.") for k in after_b)


def test_thread_self_follows_the_entered_namespace(pair: Pair) -> None:
    """From a worker thread /proc/self/net is the main thread's namespace; thread-self is not."""
    pair.send()
    _eventually(lambda: counters.snmp(pair.ns_b)["Udp.NoPorts"], lambda n: n == 1)
    seen: dict[str, int] = {}

    def read() -> None:
        seen["a"] = counters.snmp(pair.ns_a)["Udp.NoPorts"]
        seen["b"] = counters.snmp(pair.ns_b)["Udp.NoPorts"]

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    assert seen == {"a": 0, "b": 1}


def test_link_stats_count_both_ends(pair: Pair) -> None:
    before_a, before_b = counters.link_stats(pair.ns_a), counters.link_stats(pair.ns_b)
    pair.send(count=5)
    _eventually(lambda: counters.snmp(pair.ns_b)["Udp.NoPorts"], lambda n: n == 5)
    after_a, after_b = counters.link_stats(pair.ns_a), counters.link_stats(pair.ns_b)
    assert set(after_a) == {"lo", pair.dev_a} and set(after_b) == {"lo", pair.dev_b}
    sent = after_a[pair.dev_a]["tx_packets"] - before_a[pair.dev_a]["tx_packets"]
    received = after_b[pair.dev_b]["rx_packets"] - before_b[pair.dev_b]["rx_packets"]
    assert sent >= 5 and received == sent  # 5 datagrams plus the ARP request


def test_qdisc_drops_are_counted(pair: Pair) -> None:
    _tiny_tbf(pair)
    before = counters.qdisc_stats(pair.ns_a)
    pair.send(count=20, size=1000)
    after = counters.qdisc_stats(pair.ns_a)
    label = "tbf 1: parent root"
    assert label in after[pair.dev_a], after
    drops = after[pair.dev_a][label]["drops"] - before[pair.dev_a][label]["drops"]
    packets = after[pair.dev_a][label]["packets"] - before[pair.dev_a][label]["packets"]
    queued = after[pair.dev_a][label]["qlen"]
    assert drops > 0
    assert drops + packets + queued == 21  # 20 datagrams and one ARP request


def test_softnet_has_one_row_per_online_cpu() -> None:
    rows = counters.softnet()
    assert len(rows) == os.sysconf("SC_NPROCESSORS_ONLN")
    assert [row["cpu"] for row in rows] == sorted(row["cpu"] for row in rows)
    for row in rows:
        assert {"processed", "dropped", "time_squeeze"} <= set(row)
        assert all(isinstance(v, int) for k, v in row.items() if k != "extra")


def test_softnet_processed_counts_veth_backlog(pair: Pair) -> None:
    before = sum(row["processed"] for row in counters.softnet())
    pair.send(count=10)
    _eventually(lambda: counters.snmp(pair.ns_b)["Udp.NoPorts"], lambda n: n == 10)
    after = sum(row["processed"] for row in counters.softnet())
    assert after - before >= 10  # veth delivers through netif_rx and the per-CPU backlog


def test_parse_softnet_keeps_unknown_columns() -> None:
    rows = counters.parse_softnet("0000000a 00000002 00000001 0 0 0 0 0 0 00000003 0 0 00000000 0 0 00000007\n")
    assert rows[0]["processed"] == 10 and rows[0]["dropped"] == 2 and rows[0]["time_squeeze"] == 1
    assert rows[0]["received_rps"] == 3 and rows[0]["extra"]["col15"] == 7


def test_snapshot_delta_reports_only_changes(pair: Pair) -> None:
    names = [pair.ns_a, pair.ns_b]
    before = counters.Snapshot.take(names)
    pair.send(count=2)
    _eventually(lambda: counters.snmp(pair.ns_b)["Udp.NoPorts"], lambda n: n == 2)
    after = counters.Snapshot.take(names)
    change = counters.delta(before, after)
    json.dumps(change)
    assert 0 < change["seconds"] < 2
    b = change["namespaces"][pair.ns_b]
    assert b["snmp"]["Udp.NoPorts"] == 2
    assert b["links"][pair.dev_b]["rx_packets"] >= 2
    assert "lo" not in b["links"]
    assert "Udp.NoPorts" not in change["namespaces"][pair.ns_a]["snmp"]
    assert all(value != 0 for value in b["snmp"].values())
    assert "Ip.DefaultTTL" not in b["snmp"]


def test_delta_of_identical_snapshots_is_empty(pair: Pair) -> None:
    snap = counters.Snapshot.take([pair.ns_a])
    time.sleep(0.01)
    assert counters.delta(snap, snap) == {"seconds": 0.0}


def test_parse_snmp_keeps_negative_values_and_skips_only_a_field_that_is_no_number() -> None:
    text = "Tcp: RtoMin MaxConn\nTcp: 200 -1\nUdp: InDatagrams Odd NoPorts\nUdp: 5 x 7\nIp: A\nIcmp: 1\n"
    assert counters.parse_snmp(text) == {"Tcp.RtoMin": 200, "Tcp.MaxConn": -1, "Udp.InDatagrams": 5, "Udp.NoPorts": 7}


def test_diff_reports_what_moved_at_every_depth_and_new_keys_from_zero() -> None:
    before = {"snmp": {"Udp.NoPorts": 3, "Ip.InReceives": 10}, "links": {"eth0": {"rx_packets": 1}}}
    after = {
        "snmp": {"Udp.NoPorts": 3, "Ip.InReceives": 12, "Tcp.OutRsts": 2},
        "links": {"eth0": {"rx_packets": 1}, "eth1": {"rx_packets": 4, "tx_packets": 0}},
        "qdisc": {},
    }
    assert counters._diff(before, after) == {
        "snmp": {"Ip.InReceives": 2, "Tcp.OutRsts": 2},
        "links": {"eth1": {"rx_packets": 4}},
    }
    assert counters._diff(after, after) == {}
