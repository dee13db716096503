"""AF_PACKET injection and capture on the real kernel (root, own namespaces only)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from labctl.kernel import netns
from labctl.kernel.bpf import CaptureError
from labctl.kernel.capture import Capture
from labctl.kernel.inject import InjectError, Injector, write_tap
from labctl.traffic.expr import fill_defaults, parse_packet
from tests.kernel.conftest import Topo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


@dataclass
class Pair:
    """Namespaces ``a`` (10.99.1.1) and ``b`` (10.99.1.2) joined by veth eth0 <-> eth0."""

    a: str
    b: str
    mac_a: str
    mac_b: str
    ip_a: str = "10.99.1.1"
    ip_b: str = "10.99.1.2"

    def frame(self, expr: str, dst_mac: str | None = None) -> bytes:
        """``expr`` from a to b, addresses filled like the CLI does."""
        pkt = fill_defaults(parse_packet(expr), src_mac=self.mac_a, dst_mac=dst_mac or self.mac_b, src_ip=self.ip_a)
        return bytes(pkt)


@pytest.fixture
def pair(topo: Topo) -> Pair:
    a, b = topo.namespaces("pkt-a", "pkt-b")
    topo.veth(a, "eth0", b, "eth0", f"{Pair.ip_a}/24", f"{Pair.ip_b}/24")
    return Pair(a, b, topo.mac(a, "eth0"), topo.mac(b, "eth0"))


UDP_5000 = "IP(dst='10.99.1.2')/UDP(sport=1234, dport=5000)/Raw(b'lab')"
UDP_6000 = "IP(dst='10.99.1.2')/UDP(sport=1234, dport=6000)/Raw(b'other')"


def test_capture_sees_exactly_the_injected_frames_that_match(pair: Pair) -> None:
    capture = Capture(pair.b, "eth0", "udp port 5000")
    with Injector(pair.a, "eth0") as injector:
        assert injector.send(pair.frame(UDP_5000), 500) == 500
        assert injector.send(pair.frame(UDP_6000), 200) == 200
    frames = capture.read()
    capture.close()
    assert len(frames) == 500
    assert {(f.ifname, f.direction, f.pkttype) for f in frames} == {("eth0", "in", "host")}
    assert frames[0].scapy()["UDP"].dport == 5000
    assert frames[0].data == pair.frame(UDP_5000)
    assert capture.stats().packets == 500 and not capture.stats().lost


def test_direction_marks_outgoing_and_broadcast(pair: Pair) -> None:
    sender = Capture(pair.a, None, "udp port 5000")  # every device of a
    receiver = Capture(pair.b, "eth0", "udp port 5000")
    with Injector(pair.a, "eth0") as injector:
        injector.send(pair.frame(UDP_5000), 3)
        injector.send(pair.frame(UDP_5000, dst_mac="ff:ff:ff:ff:ff:ff"), 2)
    out, into = sender.read(), receiver.read()
    sender.close()
    receiver.close()
    assert [f.direction for f in out] == ["out"] * 5
    assert [f.pkttype for f in out] == ["outgoing"] * 5
    assert [f.pkttype for f in into] == ["host"] * 3 + ["broadcast"] * 2
    assert all(f.direction == "in" for f in into)
    assert out[0].timestamp <= into[0].timestamp + 1


def test_pcap_is_readable_by_tcpdump_and_tshark(pair: Pair, tmp_path: Path) -> None:
    capture = Capture(pair.b, "eth0", "udp")
    with Injector(pair.a, "eth0") as injector:
        injector.send(pair.frame(UDP_5000), 7)
    capture.read()
    capture.close()
    path = tmp_path / "b.pcap"
    assert capture.write_pcap(path) == 7
    lines = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True, check=True).stdout
    assert len(lines.splitlines()) == 7
    assert "10.99.1.1.1234 > 10.99.1.2.5000: UDP, length 3" in lines
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(path)], capture_output=True, text=True, check=True).stdout
        assert len(out.splitlines()) == 7


def test_bad_filter_reports_libpcap_message(pair: Pair) -> None:
    with pytest.raises(CaptureError, match=r"bad capture filter 'udp port': .*syntax error"):
        Capture(pair.b, "eth0", "udp port")
    with pytest.raises(CaptureError, match="no interface 'eth7'"):
        Capture(pair.b, "eth7")


def test_stats_say_when_the_ring_overflowed(pair: Pair) -> None:
    # one 4 KiB block, nobody reading: the kernel has room for a few dozen frames
    capture = Capture(pair.b, "eth0", "udp port 5000", ring_bytes=4096, block_bytes=4096)
    with Injector(pair.a, "eth0") as injector:
        injector.send(pair.frame(UDP_5000), 2000)
    frames = capture.read()
    capture.close()
    stats = capture.stats()
    assert stats.lost
    assert stats.packets == 2000
    assert stats.frames == len(frames) == stats.packets - stats.drops


def test_background_capture_stops_at_count_and_timeout(pair: Pair) -> None:
    frame = pair.frame(UDP_5000)
    with Capture(pair.b, "eth0", "udp port 5000", count=100) as capture, Injector(pair.a, "eth0") as injector:
        injector.send(frame, 300)
        assert capture.wait(1.0)
    assert len(capture.frames) == 100
    assert capture.frames[-1].ifname == "eth0"  # decoded after close: names were kept
    started = time.monotonic()
    with Capture(pair.b, "eth0", "udp port 5000", timeout=0.2) as capture:
        assert capture.wait(2.0)
    assert 0.15 < time.monotonic() - started < 1.5


def test_vlan_tag_moved_to_metadata_is_put_back(pair: Pair) -> None:
    capture = Capture(pair.b, "eth0")
    with Injector(pair.a, "eth0") as injector:
        injector.send(pair.frame("Ether()/Dot1Q(vlan=5)/IP(dst='10.99.1.2')/UDP(dport=5000)"), 1)
    frames = capture.read()
    capture.close()
    assert len(frames) == 1
    assert frames[0].scapy()["Dot1Q"].vlan == 5


def test_rate_paces_the_injection(pair: Pair) -> None:
    with Injector(pair.a, "eth0") as injector:
        started = time.perf_counter()
        assert injector.send(pair.frame(UDP_5000), 200, rate=2000) == 200
    assert time.perf_counter() - started >= 0.09


def test_qdisc_drops_are_counted_once_and_taps_see_only_what_left(pair: Pair) -> None:
    netns.run(pair.a, ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "1mbit", "burst", "1600",
                       "limit", "1600"], check=True)  # fmt: skip
    capture = Capture(pair.a, "eth0", "udp port 5000")
    with Injector(pair.a, "eth0") as injector:
        sent = injector.send(pair.frame(UDP_5000), 300)
        assert 0 < sent < 300
        assert sent + sum(injector.errors.values()) == 300
        assert injector.errors.get(errno.ENOBUFS, 0) > 0
    time.sleep(0.1)  # tbf releases what it queued
    frames = capture.read()
    capture.close()
    assert len(frames) == sent  # T8: captured = sent - qdisc drops


def test_unsendable_frame_raises(pair: Pair) -> None:
    with Injector(pair.a, "eth0") as injector, pytest.raises(InjectError, match="too long"):
        injector.send(pair.frame(UDP_5000) + b"\0" * 2000, 1)
    with pytest.raises(InjectError, match="cannot inject on eth7"):
        Injector(pair.a, "eth7")


def _open_tap(namespace: str, name: str) -> int:
    """A tap device inside ``namespace`` (the fd a VM's NIC would hold)."""
    tunsetiff, iff_tap, iff_no_pi = 0x400454CA, 0x0002, 0x1000
    with netns.entered(namespace):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", name.encode(), iff_tap | iff_no_pi))
    with netns.netlink(namespace) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
    return fd


def test_write_tap_enters_the_node_as_received(pair: Pair) -> None:
    fd = _open_tap(pair.b, "tap0")
    try:
        capture = Capture(pair.b, "tap0", "udp port 5000")
        frame = pair.frame(UDP_5000, dst_mac="ff:ff:ff:ff:ff:ff")
        assert write_tap(fd, frame) == len(frame)
        frames = capture.read()
        capture.close()
    finally:
        os.close(fd)
    assert [(f.ifname, f.direction, f.data) for f in frames] == [("tap0", "in", frame)]
