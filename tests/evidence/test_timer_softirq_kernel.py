"""On the real kernel: what another namespace's timer sends in a lab task's context is not the lab's.

The case ``run -j 6`` hit: tcp-connect's SYN retransmission timer fired while rx-gro's sender was current,
and the SYN, sent out of tcp-connect's ``eth0``, counted as rx-gro's.  Here a connect in another lab's
namespace is pinned to one CPU, its SYN goes unanswered, and a thread that stands for a lab's sender keeps
that CPU busy until the retransmission timer has fired in its context.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from labctl.evidence.attribution import Scope, attribute
from labctl.evidence.window import BASE_EVENTS
from labctl.kernel import netns
from labctl.kernel.tracefs import TraceSession
from tests.conftest import LabFactory
from tests.topologies import two_nodes

TOPOLOGY = two_nodes("10.0.97.1/24", "10.0.97.2/24", a="client", b="peer")

CONNECT = (
    "import socket, time; s = socket.socket(); s.setblocking(False); "
    "s.connect_ex(('10.0.97.9', 80)); time.sleep(1.6)"
)
"""A SYN to an address whose MAC nobody has: the peer drops it unseen, and the client's timer sends it again
after the initial RTO (1 s), from softirq on the CPU the connect ran on."""


def _busy(cpu: int, until: float, tid: list[int]) -> None:
    os.sched_setaffinity(0, {cpu})  # this thread only
    tid.append(threading.get_native_id())
    while time.monotonic() < until:
        pass


def test_a_foreign_syn_retransmission_in_a_lab_tasks_context_is_not_the_labs(make_lab: LabFactory) -> None:
    topo = make_lab(TOPOLOGY)
    client = netns.namespace_name(topo.name, "client")
    subprocess.run(
        ["ip", "-n", client, "neigh", "replace", "10.0.97.9", "lladdr", "02:00:00:00:97:99", "dev", "eth0"],
        check=True,
    )
    cpu = max(os.sched_getaffinity(0))
    with TraceSession(BASE_EVENTS) as session:
        since = time.monotonic()
        tid: list[int] = []
        busy = threading.Thread(target=_busy, args=(cpu, since + 1.4, tid))
        busy.start()
        while not tid:
            time.sleep(0.001)
        connect = ["ip", "netns", "exec", client, "taskset", "-c", str(cpu), "python3", "-c", CONNECT]
        subprocess.run(connect, check=True)
        busy.join()
        until = time.monotonic()
        events = session.events()
    syns = [e for e in events if e.key == "net:net_dev_queue" and e.device == "eth0" and since <= e.timestamp]
    resent = [e for e in syns if e.in_interrupt and e.pid == tid[0]]
    if not resent:  # the timer ran elsewhere (ksoftirqd, or migrated): nothing was lent, nothing to judge
        pytest.skip(f"the retransmission did not run in the busy thread's context: {[(e.pid, e.flags) for e in syns]}")
    packets, chosen = attribute(events, Scope({"eth0"}, {tid[0]}, since, until))
    assert [p for p in packets if p.events[0] in resent] == []
    assert not {id(e) for e in resent} & {id(e) for e in chosen}
