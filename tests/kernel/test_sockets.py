"""A node's own UDP sockets on the real kernel (root, own namespaces only)."""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from labctl.kernel import netns
from labctl.kernel.bpf import CaptureError
from labctl.kernel.sockets import SocketFilterError, UdpListener, send_udp
from tests.kernel.conftest import Topo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


@dataclass
class Pair:
    """Namespaces ``a`` (10.99.2.1) and ``b`` (10.99.2.2) joined by veth eth0 <-> eth0."""

    a: str
    b: str
    ip_a: str = "10.99.2.1"
    ip_b: str = "10.99.2.2"


@pytest.fixture
def pair(topo: Topo) -> Pair:
    a, b = topo.namespaces("sock-a", "sock-b")
    topo.veth(a, "eth0", b, "eth0", f"{Pair.ip_a}/24", f"{Pair.ip_b}/24")
    return Pair(a, b)


def udp_counters(namespace: str) -> dict[str, int]:
    """The Udp line of /proc/net/snmp as the namespace sees it."""
    with netns.entered(namespace):
        lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
    names, values = (line.split()[1:] for line in lines if line.startswith("Udp:"))
    return dict(zip(names, map(int, values), strict=True))


def test_listener_receives_payload_and_source(pair: Pair) -> None:
    with UdpListener(pair.b, 5000) as listener:
        result = send_udp(pair.a, pair.ip_b, 5000, b"hello", count=3, sport=4000)
        assert result.ok and result.sent == 3
        assert listener.wait(3)
        assert listener.received() == [(b"hello", (pair.ip_a, 4000))] * 3
        assert listener.stats().drops == 0


def test_full_receive_queue_drops_later_datagrams(pair: Pair) -> None:
    before = udp_counters(pair.b)
    with UdpListener(pair.b, 5001, rcvbuf=1, read=False) as listener:
        assert send_udp(pair.a, pair.ip_b, 5001, b"x" * 100, count=50).sent == 50
        time.sleep(0.05)
        stats = listener.stats()
    after = udp_counters(pair.b)
    assert 0 < stats.queued_bytes <= stats.rcvbuf + 2048  # the queue holds only a datagram or two
    assert stats.drops >= 40
    assert after["RcvbufErrors"] - before["RcvbufErrors"] == stats.drops
    assert stats.received == 0


def test_drop_all_socket_filter_receives_nothing(pair: Pair) -> None:
    before = udp_counters(pair.b)
    with UdpListener(pair.b, 5002, socket_filter="drop-all") as listener:
        send_udp(pair.a, pair.ip_b, 5002, b"x", count=5)
        time.sleep(0.05)
        assert listener.received() == []
        assert listener.stats().drops == 5
    after = udp_counters(pair.b)
    assert after["InErrors"] - before["InErrors"] == 5
    assert after["RcvbufErrors"] == before["RcvbufErrors"]


def test_tcpdump_expression_as_socket_filter(pair: Pair) -> None:
    with UdpListener(pair.b, 5003, socket_filter=f"udp src port 7000 and src host {pair.ip_a}") as listener:
        send_udp(pair.a, pair.ip_b, 5003, b"no", count=2, sport=7001)
        send_udp(pair.a, pair.ip_b, 5003, b"yes", count=2, sport=7000)
        assert listener.wait(2)
        time.sleep(0.02)
        assert [payload for payload, _ in listener.received()] == [b"yes", b"yes"]
        assert listener.stats().drops == 2


def test_bad_socket_filters_are_refused(pair: Pair) -> None:
    with pytest.raises(CaptureError, match="syntax error"):
        UdpListener(pair.b, 5004, socket_filter="udp port")
    with pytest.raises(SocketFilterError, match="length"):
        UdpListener(pair.b, 5004, socket_filter="greater 100")


def test_send_without_route_reports_enetunreach(pair: Pair) -> None:
    result = send_udp(pair.a, "10.98.7.1", 5000, b"x", count=2)
    assert (result.sent, result.failed, result.errno) == (0, 2, errno.ENETUNREACH)
    assert result.error_name == "ENETUNREACH"


def test_send_from_foreign_source_reports_eaddrnotavail(pair: Pair) -> None:
    result = send_udp(pair.a, pair.ip_b, 5000, b"x", src="10.98.7.1")
    assert result.errno == errno.EADDRNOTAVAIL and result.sent == 0


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
def test_output_drop_reports_eperm(pair: Pair) -> None:
    rules = "table ip t {\n chain out {\n type filter hook output priority 0\n udp dport 5005 drop\n }\n}\n"
    netns.run(pair.a, ["nft", "-f", "-"], input=rules, text=True, check=True)
    result = send_udp(pair.a, pair.ip_b, 5005, b"x", count=3)
    assert (result.sent, result.errors) == (0, {errno.EPERM: 3})
    assert send_udp(pair.a, pair.ip_b, 5006, b"x").ok
