"""Window.settle on the real kernel: it ends when the lab is quiet, waits while a qdisc still holds packets,
and a stated settle is a fixed wait."""

from __future__ import annotations

import time

from labctl.evidence.window import QUIET_MAX_SECONDS, QUIET_SECONDS, Window, WindowSpec
from labctl.kernel import counters, netns
from labctl.kernel.sockets import send_udp
from tests.conftest import LabFactory

SHAPED = """\
topology:
  nodes:
    client:
      interfaces:
        eth0:
          addresses: [10.0.7.1/24]
          tc:
            qdisc: {kind: tbf, rate: 1mbit, burst: 1600b, limit: 30000b}
    server:
      interfaces:
        eth0: {addresses: [10.0.7.2/24]}
  links:
    - endpoints: ["client:eth0", "server:eth0"]
"""


def _held(namespace: str) -> int:
    return sum(q.get("qlen", 0) for qs in counters.qdisc_stats(namespace).values() for q in qs.values())


def test_settle_waits_for_the_qdisc_then_ends_when_quiet(make_lab: LabFactory) -> None:
    topo = make_lab(SHAPED)
    client = netns.namespace_name(topo.name, "client")
    send_udp(client, "10.0.7.2", 9, b"w", count=1)  # ARP resolved first: the burst below is only the burst
    with Window(topo, WindowSpec()) as window:
        window.settle()
        # 20 datagrams of 1000 bytes at 1 mbit: about 160 ms in the tbf after the send returns
        send_udp(client, "10.0.7.2", 9, b"x" * 1000, count=20)
        assert _held(client) > 0
        waited = window.settle()
        assert _held(client) == 0, "settle ended while the tbf still held packets"
        assert QUIET_SECONDS <= waited < QUIET_MAX_SECONDS
        start = time.monotonic()
        again = window.settle()  # nothing sent since: quiet at once
        assert again < QUIET_MAX_SECONDS and time.monotonic() - start >= QUIET_SECONDS
        assert window.settle(0.2) == 0.2  # a stated settle is a fixed wait
        window.close()
    assert window.settled[-1] == 0.2


def test_settle_waits_for_a_listener_that_has_not_read(make_lab: LabFactory) -> None:
    topo = make_lab(SHAPED)
    with Window(topo, WindowSpec()) as window:
        unread = [3]

        def pending() -> bool:  # as a reader thread that takes its datagrams late
            unread[0] -= 1
            return unread[0] > 0

        window.busy_while(pending)
        window.settle()
        assert unread[0] <= 0
        window.close()
