"""The ``vlan`` capture filter matches received tagged frames, as tcpdump's does (real kernel).

On this kernel a tagged frame injected on one end of a veth arrives at the
other end's packet sockets with its tag in skb metadata (``skb_vlan_untag`` in
``__netif_receive_skb_core`` runs before the taps, for any device, even
without the 802.1Q module), while the sender's own tap sees the tag in the
payload.  The expected rows below are what ``tcpdump -Q in`` printed for the
same frames in the same namespaces.
"""

from __future__ import annotations

import os
import time

import pytest

from labctl.kernel import capture as kernel_capture
from labctl.kernel.capture import Capture
from labctl.kernel.inject import Injector
from tests.kernel.test_packet import Pair, pair  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

TAGGED = "Dot1Q(vlan=100)/IP(dst='10.99.1.2')/UDP(sport=1234, dport=9)"
UNTAGGED = "IP(dst='10.99.1.2')/UDP(sport=1234, dport=9)"


def _received(ends: Pair, expr: str, expected: int) -> list[str]:
    """Ethertypes (after the MACs) of frames received on b's eth0 that ``expr`` matched.

    Waits for the ``expected`` frames (a loaded machine delivers late), then a little more for extra ones.
    """
    capture = Capture(ends.b, "eth0", expr)
    with Injector(ends.a, "eth0") as injector:
        injector.send(_frame(ends, TAGGED), 1)
        injector.send(_frame(ends, UNTAGGED), 1)
    frames = capture.read(count=expected, timeout=5.0) if expected else []
    time.sleep(0.2)
    frames += capture.read()
    capture.close()
    return [f.data[12:14].hex() for f in frames if f.direction == "in"]


def _frame(ends: Pair, expr: str) -> bytes:
    from scapy.layers.l2 import Dot1Q, Ether

    from labctl.traffic.expr import parse_packet

    inner = parse_packet(expr.removeprefix("Dot1Q(vlan=100)/"))
    head = Ether(src=ends.mac_a, dst=ends.mac_b)
    pkt = head / Dot1Q(vlan=100) / inner if expr.startswith("Dot1Q") else head / inner
    return bytes(pkt)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("vlan 100", ["8100"]),
        ("vlan", ["8100"]),
        ("vlan 100 and udp port 9", ["8100"]),
        ("vlan 200", []),
        ("vlan 100 and udp port 10", []),
        ("not vlan", ["0800"]),
        ("udp port 9", ["8100", "0800"]),  # tcpdump on Linux too: a tag the kernel took out is not seen
    ],
)
def test_vlan_filters_match_received_frames_as_tcpdump(pair: Pair, expr: str, expected: list[str]) -> None:  # noqa: F811
    assert _received(pair, expr, len(expected)) == expected


def test_the_tag_arrives_in_metadata_so_the_plain_program_misses_it(
    pair: Pair,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the metadata path, libpcap's own program for ``vlan 100`` never matches a received frame."""
    monkeypatch.setattr(kernel_capture, "needs_vlan_tags", lambda expr: False)
    assert _received(pair, "vlan 100", 0) == []
    monkeypatch.undo()
    assert _received(pair, "vlan 100", 1) == ["8100"]


def test_the_sender_sees_the_tag_in_the_payload(pair: Pair) -> None:  # noqa: F811
    capture = Capture(pair.a, "eth0", "vlan 100")
    with Injector(pair.a, "eth0") as injector:
        injector.send(_frame(pair, TAGGED), 1)
    frames = capture.read(count=1, timeout=5.0)
    capture.close()
    assert [(f.direction, f.data[12:16].hex()) for f in frames] == [("out", "81000064")]


def test_count_counts_matching_frames_only(pair: Pair) -> None:  # noqa: F811
    """Frames the userspace half rejects are not taken: -c 1 still waits for the one that matches."""
    capture = Capture(pair.b, "eth0", "vlan 200", count=1)
    with Injector(pair.a, "eth0") as injector:
        injector.send(_frame(pair, TAGGED), 5)
    time.sleep(0.3)
    assert capture.read() == []
    capture.close()
