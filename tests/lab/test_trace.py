"""``labctl trace``: paths of injected packets on the real kernel, attribution, placement, CLI.

Every scenario of the notes' receive path is traced once, on its own lab,
and the test checks where the packet ended, why, and that the stages before
that point carry the right evidence.  Timings are never asserted here
(bench/bench_trace.py measures them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from labctl.kernel import counters, netns, sysctl, tracefs
from labctl.kernel.capture import Capture
from labctl.kernel.sockets import UdpListener
from labctl.kernel.tracefs import SkbChain, TraceEvent
from labctl.lab import trace as lab_trace
from labctl.lab.trace import Follower, Knowledge, PacketPath, PathBuilder, Placer, TraceResult, trace_packet
from labctl.topology.model import Topology
from tests.conftest import LabFactory
from tests.topologies import VMS

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and tracefs")
REPO = Path(__file__).resolve().parents[2]

PAIR = """\
topology:
  nodes:
    client:
      interfaces:
        eth0: {{addresses: [10.0.0.1/24]}}
    server:
      {server_extra}interfaces:
        eth0: {{addresses: [10.0.0.2/24]{server_eth0}}}
  links:
    - endpoints: ["client:eth0", "server:eth0"]
"""

ROUTER = """\
topology:
  nodes:
    h1:
      interfaces:
        eth0: {{addresses: [10.0.1.2/24]}}
      routes:
        - {{dst: default, via: 10.0.1.1}}
    r1:
      sysctls:
        net.ipv4.ip_forward: {forward}
      interfaces:
        eth0: {{addresses: [10.0.1.1/24]}}
        eth1: {{addresses: [10.0.2.1/24]}}
    h2:
      interfaces:
        eth0: {{addresses: [10.0.2.2/24]}}
      routes:
        - {{dst: default, via: 10.0.2.1}}
  links:
    - endpoints: ["h1:eth0", "r1:eth0"]
    - endpoints: ["r1:eth1", "h2:eth0"]
"""

CLOSED = "IP(dst='10.0.0.2')/UDP(dport=5999)"


def pair(server_eth0: str = "", server_extra: str = "") -> str:
    return PAIR.format(server_eth0=server_eth0, server_extra=server_extra)


def names(path: PacketPath) -> list[str]:
    return [stage.name for stage in path.stages]


def stage(path: PacketPath, name: str) -> lab_trace.Stage:
    return next(s for s in path.stages if s.name == name)


def only_packet(result: TraceResult) -> PacketPath:
    assert result.sent == 1 and len(result.packets) == 1, result.as_dict()
    return result.packets[0]


def ns(lab: Topology, node: str) -> str:
    return netns.namespace_name(lab.name, node)


# ---------------------------------------------------------------- the receive path, one scenario each


@ROOT
def test_closed_port_is_no_socket_in_udp(make_lab: LabFactory) -> None:
    topo = make_lab(pair())
    packet = only_packet(trace_packet(topo, "client", CLOSED))
    assert [(s.node, s.device, s.hop_from) for s in packet.segments] == [
        ("client", None, None),
        ("server", "eth0", ("client", "eth0")),
    ]
    assert names(packet)[:1] == ["dev_queue_xmit"]
    server = names(packet)[names(packet).index("netif_rx") :]
    assert server == [
        "netif_rx",
        "backlog",
        "netif_receive_skb",
        "ip_rcv",
        "PREROUTING",
        "routing",
        "LOCAL_IN",
        "UDP",
    ]
    ending = packet.ending
    assert (ending.fate, ending.reason, ending.function, ending.node, ending.stage) == (
        "dropped",
        "NO_SOCKET",
        "__udp4_lib_rcv",
        "server",
        "UDP",
    )
    assert ending.counters["Udp.NoPorts"] == 1 and ending.counters["Icmp.OutDestUnreachs"] == 1
    assert stage(packet, "netif_rx").evidence == "traced"
    assert stage(packet, "UDP").evidence == "traced"  # the drop inside UDP is the trace
    assert stage(packet, "PREROUTING").evidence == "inferred"  # no rule counted it: not claimed as seen
    assert stage(packet, "routing").detail == "local"


@ROOT
def test_delivered_to_a_reading_socket(make_lab: LabFactory) -> None:
    topo = make_lab(pair())
    with UdpListener(ns(topo, "server"), 5000) as listener:
        packet = only_packet(trace_packet(topo, "client", "IP(dst='10.0.0.2')/UDP(dport=5000)/Raw(b'hi')"))
        assert listener.wait(1)
    assert packet.ending.fate == "delivered" and packet.ending.node == "server", packet.ending
    assert names(packet)[-3:] == ["LOCAL_IN", "UDP", "socket"]
    # 6.18 frees a read datagram later, on the CPU that allocated it (skb_attempt_defer_free):
    # the consume is traced only if that happens within the trace; recvmsg's counter always moves
    if packet.ending.evidence == "traced":
        assert packet.ending.function in ("skb_consume_udp", "__consume_stateless_skb", "skb_defer_free_flush")
    else:
        assert packet.ending.counters == {"Udp.InDatagrams": 1}


@ROOT
def test_queued_in_a_socket_nobody_reads(make_lab: LabFactory) -> None:
    topo = make_lab(pair())
    with UdpListener(ns(topo, "server"), 5000, read=False):
        packet = only_packet(trace_packet(topo, "client", "IP(dst='10.0.0.2')/UDP(dport=5000)/Raw(b'hi')"))
    assert packet.ending.fate == "queued" and packet.ending.evidence == "counted"
    assert stage(packet, "socket").counters["socket.rx_queue_bytes"] > 0


@ROOT
def test_foreign_mac_is_otherhost_at_ip_rcv(make_lab: LabFactory) -> None:
    topo = make_lab(pair())
    result = trace_packet(topo, "client", "Ether(dst='02:00:00:00:00:99')/IP(dst='10.0.0.2')/UDP(dport=5000)")
    packet = only_packet(result)
    assert packet.ending.reason == "OTHERHOST" and packet.ending.function in ("ip_rcv_core", "ip_rcv")
    assert packet.ending.stage == "ip_rcv" and packet.ending.node == "server"
    assert names(packet)[-1] == "ip_rcv"  # nothing is claimed after the drop
    assert "PREROUTING" not in names(packet)


@ROOT
def test_input_drop_is_netfilter_drop_yet_captured(make_lab: LabFactory) -> None:
    body = pair(server_extra='iptables: ["-A INPUT -p udp --dport 5000 -j DROP"]\n      ')
    topo = make_lab(body)
    capture = Capture(ns(topo, "server"), "eth0", "udp port 5000")
    try:
        result = trace_packet(topo, "client", "IP(dst='10.0.0.2')/UDP(dport=5000)/Raw(b'x')")
        frames = capture.read(count=1, timeout=1.0)
    finally:
        capture.close()
    packet = only_packet(result)
    assert len(frames) == 1  # the tap saw what netfilter dropped
    assert (packet.ending.reason, packet.ending.function, packet.ending.stage) == (
        "NETFILTER_DROP",
        "nf_hook_slow",
        "LOCAL_IN",
    )
    assert packet.ending.counters["filter:INPUT:1"] == 1
    tap = stage(packet, "AF_PACKET tap")
    assert tap.evidence == "inferred" and tap.detail.startswith("1 packet socket")
    assert names(packet).index("AF_PACKET tap") < names(packet).index("ip_rcv")
    local_in = stage(packet, "LOCAL_IN")
    assert local_in.evidence == "counted" and local_in.counters == {"filter:INPUT:1": 1}
    assert "UDP" not in names(packet)  # the drop in LOCAL_IN ends the path
    assert result.rules["server"]["filter:INPUT:1"].packets == 1


@ROOT
def test_forwarding_off_is_ip_inaddrerrors(make_lab: LabFactory) -> None:
    topo = make_lab(ROUTER.format(forward=0))
    packet = only_packet(trace_packet(topo, "h1", "IP(dst='10.0.2.2')/UDP(dport=5000)"))
    assert [s.node for s in packet.segments] == ["h1", "r1"]
    assert (packet.ending.reason, packet.ending.function, packet.ending.stage) == (
        "IP_INADDRERRORS",
        "ip_error",
        "routing",
    )
    routing = stage(packet, "routing")
    assert "forwarding is off" in routing.detail and routing.counters["Ip.InAddrErrors"] == 1
    assert packet.ending.counters["Ip.InAddrErrors"] == 1


@ROOT
def test_forwarding_on_follows_the_skb_through_the_router(make_lab: LabFactory) -> None:
    topo = make_lab(ROUTER.format(forward=1))
    result = trace_packet(topo, "h1", "IP(dst='10.0.2.2')/UDP(dport=5999)")
    packet = only_packet(result)
    assert [(s.node, s.device, s.hop_from) for s in packet.segments] == [
        ("h1", None, None),
        ("r1", "eth0", ("h1", "eth0")),
        ("h2", "eth0", ("r1", "eth1")),
    ]
    r1 = [s.name for s in packet.segments[1].stages]
    assert r1[r1.index("routing") :][:4] == ["routing", "FORWARD", "POSTROUTING", "dev_queue_xmit"]
    assert stage(packet, "routing").detail == "forward → eth1"
    # a delta over the trace: the ICMP error h2 sends back is forwarded by r1 too
    assert stage(packet, "routing").counters["Ip.ForwDatagrams"] >= 1
    assert packet.ending.reason == "NO_SOCKET" and packet.ending.node == "h2"
    icmp = [p for p in result.related if p.ending.function == "icmp_rcv"]
    assert icmp and icmp[0].nodes == ["h2", "r1", "h1"]


@ROOT
def test_full_receive_buffer_is_socket_rcvbuff(make_lab: LabFactory) -> None:
    topo = make_lab(pair())
    with UdpListener(ns(topo, "server"), 5000, rcvbuf=1, read=False):
        result = trace_packet(topo, "client", "IP(dst='10.0.0.2')/UDP(dport=5000)/Raw(b'x'*1000)", count=20)
    assert len(result.packets) == 20
    fates = result.fates
    assert fates.get("dropped:SOCKET_RCVBUFF", 0) >= 10 and fates.get("queued", 0) >= 1, fates
    dropped = next(p for p in result.packets if p.ending.reason == "SOCKET_RCVBUFF")
    assert dropped.ending.stage == "socket" and names(dropped)[-2:] == ["UDP", "socket"]
    assert dropped.ending.counters["Udp.RcvbufErrors"] == fates["dropped:SOCKET_RCVBUFF"]
    assert result.counters["server"]["Udp.RcvbufErrors"] == fates["dropped:SOCKET_RCVBUFF"]


@ROOT
def test_socket_filter_is_socket_filter(make_lab: LabFactory) -> None:
    topo = make_lab(pair())
    with UdpListener(ns(topo, "server"), 5000, socket_filter="drop-all") as listener:
        result = trace_packet(topo, "client", "IP(dst='10.0.0.2')/UDP(dport=5000)/Raw(b'x')", count=2)
        assert listener.received() == []
    assert result.fates == {"dropped:SOCKET_FILTER": 2}
    packet = result.packets[0]
    assert packet.ending.stage == "socket" and packet.ending.counters.get("socket.drops") == 2


@ROOT
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="RPS to another CPU needs two CPUs")
def test_rps_to_a_tiny_backlog_is_cpu_backlog(make_lab: LabFactory) -> None:
    key = "net.core.netdev_max_backlog"
    original = sysctl.read(key)
    owner = f"pid:{os.getpid()}"
    topo = make_lab(pair(server_eth0=', rps_cpus: "2"'))
    sysctl.GlobalOverrides.acquire(owner, key, 8)
    try:
        assert sysctl.read(key) == "8"
        result = trace_packet(topo, "client", "IP(dst='10.0.0.2')/UDP(dport=9)/Raw(b'b'*64)", count=5000, cpu=0)
    finally:
        sysctl.GlobalOverrides.release(owner)
    assert sysctl.read(key) == original  # the host-wide value is back
    assert result.lost_events == 0, "the host was too busy: the trace buffer overflowed"
    dropped = [p for p in result.packets if p.ending.reason == "CPU_BACKLOG"]
    # how many overflow is scheduling (statistical); that each one is explained right is the point
    assert len(dropped) >= 1, result.fates
    assert all(p.ending.function == "enqueue_to_backlog" and p.ending.node == "server" for p in dropped)
    softnet_drops = sum(cols.get("dropped", 0) for cols in result.softnet.values())
    assert softnet_drops >= len(dropped)  # host-wide: other traffic may add to it
    assert dropped[0].ending.counters["softnet.cpu1.dropped"] >= len(dropped)
    delivered = [p for p in result.packets if p.ending.reason == "NO_SOCKET"]
    assert delivered, "some packets made it through the backlog"
    backlog = stage(delivered[0], "backlog")
    assert backlog.cpu == 1 and "RPS from cpu0" in backlog.detail


@ROOT
def test_gro_on_veth_uses_napi_gro_receive(make_lab: LabFactory) -> None:
    # TSO is on at the sender, so veth hands an skb to NAPI only when the receiver can take it
    # whole (veth_skb_is_eligible_for_gro): rx-gro-list, as in labs/rx-gro.yaml
    topo = make_lab(pair(server_eth0=", gro: true, features: {rx-gro-list: true}"))
    packet = only_packet(trace_packet(topo, "client", CLOSED))
    assert "napi_gro_receive" in names(packet) and "netif_rx" not in names(packet)
    assert stage(packet, "napi_gro_receive").event == "net:napi_gro_receive_entry"
    assert packet.ending.reason == "NO_SOCKET"


@ROOT
def test_a_vm_frame_crosses_relays_and_the_bridge(make_lab: LabFactory) -> None:
    topo = make_lab(VMS)
    packet = only_packet(trace_packet(topo, "vm1", "IP(dst='192.168.3.103')/UDP(dport=5999)"))
    assert [(s.node, s.device, s.hop_from) for s in packet.segments] == [
        ("vm1", None, None),
        ("host", "tap1", ("vm1", "eth0")),
        ("vm2", "eth0", ("host", "tap2")),
    ]
    assert [s.name for s in packet.stages if s.name == "relay"] == ["relay", "relay"]  # the relay read it twice
    bridge = stage(packet, "bridge")
    assert bridge.node == "host" and bridge.detail == "br0: forward → tap2"
    assert packet.ending.reason == "NO_SOCKET" and packet.ending.node == "vm2"


@ROOT
def test_a_frame_for_the_bridge_goes_up_the_stack(make_lab: LabFactory) -> None:
    topo = make_lab(VMS)
    packet = only_packet(trace_packet(topo, "vm1", "IP(dst='192.168.3.101')/UDP(dport=5999)"))
    host = [s for s in packet.stages if s.node == "host"]
    assert [(s.name, s.device) for s in host[:3]] == [
        ("netif_receive_skb", "tap1"),
        ("bridge", "tap1"),
        ("netif_receive_skb", "br0"),
    ]
    assert packet.ending.reason == "NO_SOCKET" and (packet.ending.node, packet.ending.device) == ("host", "br0")


# ---------------------------------------------------------------- attribution under noise


NOISE = r"""
import sys, time
from labctl.kernel.inject import Injector
ns, frame, burst, pause = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 30
with Injector(ns, "eth0") as injector:
    print("go", flush=True)
    while time.monotonic() < deadline:
        injector.send(frame, burst)
        time.sleep(pause)
"""


def _noise(make_lab: LabFactory, lab_name: str, burst: int, pause: float) -> Iterator[tuple[Topology, str]]:
    """Our lab, and a second lab with the same node, device and address names busy with itself.

    The noise is the very frame we trace (same MACs aside): the same
    addresses, port and length on a device also called eth0, sent by another
    process, so only attribution by the injecting task and the skb's own
    address can tell the two apart.
    """
    ours = make_lab(pair())
    other = make_lab(pair(), name=f"{lab_name}n")
    from labctl.lab.traffic import prepare_injection

    frame = prepare_injection(other, "client", None, CLOSED).frame
    proc = subprocess.Popen(
        [sys.executable, "-c", NOISE, ns(other, "client"), frame.hex(), str(burst), str(pause)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
        yield ours, ns(other, "server")
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def noisy(make_lab: LabFactory, lab_name: str) -> Iterator[tuple[Topology, str]]:
    """A flood (~30k frames/s) of look-alike traffic next to the traced packet."""
    yield from _noise(make_lab, lab_name, 20, 0.0005)


@pytest.fixture
def busy(make_lab: LabFactory, lab_name: str) -> Iterator[tuple[Topology, str]]:
    """Steady look-alike traffic (~1k frames/s): --follow parses every event in Python, so a flood
    makes it fall behind and the ring buffer overflow (it then reports lost events)."""
    yield from _noise(make_lab, lab_name, 1, 0.001)


@ROOT
def test_noise_with_the_same_names_is_excluded(noisy: tuple[Topology, str]) -> None:
    topo, noise_server = noisy
    before = counters.snmp(noise_server)["Udp.NoPorts"]
    result = trace_packet(topo, "client", CLOSED)
    noise = counters.snmp(noise_server)["Udp.NoPorts"] - before
    assert noise > 20, "the noise lab was busy while we traced"
    packet = only_packet(result)
    assert packet.ending.reason == "NO_SOCKET" and packet.nodes == ["client", "server"]
    assert result.fates == {"dropped:NO_SOCKET": 1}
    # related skbs: only what our packet caused (ARP both ways, one ICMP error), never a noise drop
    assert len(result.related) <= 3
    assert all(p.ending.reason != "NO_SOCKET" for p in result.related)
    assert result.counters["server"]["Udp.NoPorts"] == 1


@ROOT
def test_follow_shows_lab_skbs_and_not_the_noise(busy: tuple[Topology, str]) -> None:
    topo, _ = busy
    server = ns(topo, "server")
    seen: list[PacketPath] = []
    with Follower(topo, idle=0.3) as follower:
        ping = netns.popen(
            ns(topo, "client"),
            ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "10.0.0.2"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        for path in follower.paths(stop=lambda: time.monotonic() > deadline or ping.poll() is not None, poll=0.05):
            seen.append(path)
        # the last reply's skb may still be open when ping exits: it completes when freed or idle, so keep
        # reading for a few idle periods (stop=True at once lost it on a loaded machine)
        drain = time.monotonic() + 4 * follower.idle
        for path in follower.paths(stop=lambda: time.monotonic() > drain, poll=0.05):
            seen.append(path)
    assert ping.wait() == 0
    summary = follower.summary()
    assert summary.lost_events == 0
    assert summary.counters[server.rpartition(".")[2]]["Icmp.InEchos"] == 3
    story = [(p.kind, p.nodes, p.ending.fate, p.ending.function, p.events[0].pid, p.start) for p in seen]
    echoes = [p for p in seen if p.ending.function == "icmp_rcv" and p.ending.node == "server"]
    assert len(echoes) == 3, story
    # the noise ends in UDP of the other lab's server; our echo replies may end in ping_rcv (NO_SOCKET:
    # ping's raw socket got a copy, no ICMP socket wanted it) -- those are ours
    assert all(p.ending.function != "__udp4_lib_rcv" for p in seen), "a noise drop was adopted"
    replies = [p for p in seen if p.kind == "IPv4" and p.nodes == ["server", "client"] and p.ending.node == "client"]
    assert len(replies) == 3, story
    assert all(set(p.nodes) <= {"client", "server"} for p in seen)
    assert summary.ambiguous > 0  # the noise was there, and was left out


@ROOT
def test_follow_shows_what_another_labctl_process_injects(busy: tuple[Topology, str], lab_name: str) -> None:
    """labctl inject/trace run in the root namespace and hold their lab socket for a millisecond."""
    topo, _ = busy
    seen: list[PacketPath] = []
    with Follower(topo, idle=0.3) as follower:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "trace", lab_name, "client", CLOSED, "--json"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        for path in follower.paths(stop=lambda: time.monotonic() > deadline or proc.poll() is not None, poll=0.05):
            seen.append(path)
        # a path comes out once idle: read on for a few idle periods after the process ended (stop=True at
        # once lost it when the trace process ended soon after its packet, on a loaded machine)
        drain = time.monotonic() + 4 * follower.idle
        seen.extend(follower.paths(stop=lambda: time.monotonic() > drain, poll=0.05))
    assert proc.wait() == 0
    story = [(p.kind, p.nodes, p.ending.fate, p.ending.function) for p in seen]
    drops = [p for p in seen if p.ending.reason == "NO_SOCKET" and p.ending.function == "__udp4_lib_rcv"]
    assert len(drops) == 1 and drops[0].nodes == ["client", "server"], story  # ours, and none of the noise


# ---------------------------------------------------------------- the instance never outlives us


def _our_instances(pid: int) -> list[str]:
    return [name for name in tracefs.list_instances() if name.startswith(f"{tracefs.INSTANCE_PREFIX}{pid}-")]


@ROOT
def test_ctrl_c_during_a_trace_removes_the_instance(make_lab: LabFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = make_lab(pair())

    def interrupted(*args: object, **kwargs: object) -> int:
        assert _our_instances(os.getpid()), "the instance exists while tracing"
        raise KeyboardInterrupt

    monkeypatch.setattr(lab_trace.Injector, "send", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trace_packet(topo, "client", CLOSED)
    assert _our_instances(os.getpid()) == []


CLI = """
import typer
from labctl.cli.trace import register
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
@app.callback()
def main() -> None:
    pass
register(app)
app()
"""


def _run_cli_until_instance(args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 15
    while not _our_instances(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trace instance appeared"
        time.sleep(0.02)
    return proc


@ROOT
def test_sigterm_ends_follow_and_removes_the_instance(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(pair())
    proc = _run_cli_until_instance(["trace", lab_name, "--follow", "--json"])
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert _our_instances(proc.pid) == []
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["type"] == "summary" and "counters" in summary


@ROOT
def test_sigterm_during_a_long_trace_removes_the_instance(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(pair())
    proc = _run_cli_until_instance(["trace", lab_name, "client", CLOSED, "--count", "3000000"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert _our_instances(proc.pid) == []


# ---------------------------------------------------------------- the command


def _app() -> typer.Typer:
    from labctl.cli.trace import register

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """labctl, for the test."""

    register(app)
    return app


@ROOT
def test_cli_json_has_the_documented_fields(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(pair())
    result = CliRunner().invoke(_app(), ["trace", lab_name, "client:eth0", CLOSED, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("lab", "node", "interface", "packet", "summary", "frame_bytes", "count", "sent", "settled"):
        assert key in data
    for key in ("lost_events", "events", "fates", "packets", "related", "counters", "softnet", "rules"):
        assert key in data
    packet = data["packets"][0]
    assert set(packet) == {"index", "skb", "role", "kind", "length", "segments", "ending", "count", "skbs"}
    assert packet["count"] == 1 and packet["skbs"][0][:2] == [0, packet["skb"]]
    assert set(packet["segments"][1]) == {"node", "device", "from", "stages"}
    assert set(packet["segments"][1]["stages"][0]) == {
        "stage",
        "node",
        "device",
        "evidence",
        "detail",
        "event",
        "timestamp",
        "cpu",
        "pid",
        "counters",
        "note",
    }
    assert packet["ending"]["reason"] == "NO_SOCKET" and packet["ending"]["node"] == "server"
    assert data["fates"] == {"dropped:NO_SOCKET": 1}


@ROOT
def test_cli_text_tells_the_path(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(pair())
    result = CliRunner().invoke(_app(), ["trace", lab_name, "client", CLOSED])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "⟨Udp NoPorts +1⟩" in text  # counter deltas beside the stages
    path = re.sub(r" ⟨[^⟩]*⟩", "", text).replace("\n  → ", " → ")  # without them, on one line
    assert "client eth0 ─tx→ server eth0: netif_rx → backlog (cpu" in path
    assert "netif_receive_skb → ip_rcv → PREROUTING → routing: local → LOCAL_IN → UDP\n" in path
    assert "✗ dropped: NO_SOCKET at __udp4_lib_rcv" in text and "ICMP port unreachable sent" in text


def test_cli_refuses_follow_with_a_packet() -> None:
    result = CliRunner().invoke(_app(), ["trace", "lab", "client", CLOSED, "--follow"])
    assert result.exit_code == 2
    result = CliRunner().invoke(_app(), ["trace", "lab", "client"])
    assert result.exit_code == 2


@ROOT
def test_cli_bad_packet_is_bad_input(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(pair())
    result = CliRunner().invoke(_app(), ["trace", lab_name, "client", "IP(dst='10.0.0.2')/Nope()"])
    assert result.exit_code == 2
    assert _our_instances(os.getpid()) == []


# ---------------------------------------------------------------- placement without a kernel


TOPO = Topology.model_validate(
    {
        "name": "unit",
        "topology": {
            "nodes": {"a": {}, "b": {}, "c": {}},
            "links": [{"endpoints": ["a:eth0", "b:eth0"]}, {"endpoints": ["b:eth1", "c:eth0"]}],
        },
    }
)


def _ev(ts: float, key: str, dev: str | None = None, skb: int = 0x100, **fields: object) -> TraceEvent:
    values: dict[str, str | int] = {"skbaddr": skb, **{k: v for k, v in fields.items() if isinstance(v, str | int)}}
    if dev is not None:
        values["name"] = dev
    system, _, name = key.partition(":")
    return TraceEvent(ts, 0, 42, "t", system, name, values)


def _path(events: list[TraceEvent], start: tuple[str, str] | None) -> PacketPath:
    knowledge = Knowledge(TOPO)
    placed, hops = Placer(knowledge).place(events, start=start)
    chain = SkbChain(0x100, events, on_lab=True)
    return PathBuilder(knowledge, rules_known=False).build(chain, placed, hops, index=0, role="injected")


def test_every_node_has_eth0_and_the_link_decides() -> None:
    events = [
        _ev(1.0, "net:net_dev_queue", "eth0", len=42),
        _ev(1.1, "net:net_dev_start_xmit", "eth0", protocol=2048),
        _ev(1.2, "net:netif_rx", "eth0", len=28),
        _ev(1.3, "net:net_dev_xmit", "eth0", rc=0),
        _ev(1.4, "net:netif_receive_skb", "eth0", len=28),
        _ev(1.5, "net:net_dev_queue", "eth1", len=42),
        _ev(1.6, "net:net_dev_start_xmit", "eth1"),
        _ev(1.7, "net:netif_rx", "eth0", len=28),
        _ev(1.8, "net:net_dev_xmit", "eth1", rc=0),
        _ev(1.9, "skb:kfree_skb", None, reason="NO_SOCKET", location="__udp4_lib_rcv+0x1/0x2", protocol=2048),
    ]
    path = _path(events, start=("a", "eth0"))
    assert [(s.node, s.hop_from) for s in path.segments] == [
        ("a", None),
        ("b", ("a", "eth0")),
        ("c", ("b", "eth1")),
    ]
    tx_done = [s for s in path.stages if s.name == "tx done"]
    assert [s.node for s in tx_done] == ["a", "b"]  # completions go back to the sender
    assert path.ending.node == "c" and path.ending.reason == "NO_SOCKET"
    routing = stage(path, "routing")
    assert routing.detail == "forward → eth1" and routing.evidence == "inferred"


def test_what_cannot_be_placed_is_shown_raw() -> None:
    events = [_ev(1.0, "net:netif_receive_skb", "eth0", len=28), _ev(1.1, "skb:consume_skb", None, location="x+1/2")]
    path = _path(events, start=None)  # eth0 is on a, b and c: no way to tell
    assert path.segments[0].node is None
    assert path.stages[0].name == "net:netif_receive_skb" and path.stages[0].node is None


def test_a_device_only_one_node_has_places_itself() -> None:
    events = [_ev(1.0, "net:netif_receive_skb", "eth1", len=28), _ev(1.1, "skb:consume_skb", None, location="x+1/2")]
    path = _path(events, start=None)
    assert path.segments[0].node == "b"


def test_counter_words_for_people() -> None:
    from labctl.cli.trace import counter_words

    assert counter_words("Udp.NoPorts", 1) == "Udp NoPorts +1"
    assert counter_words("filter:INPUT:policy", 2) == "filter INPUT policy +2"
    assert counter_words("softnet.cpu1.dropped", 7) == "softnet cpu1 dropped +7"


def test_frame_info_reads_the_headers() -> None:
    frame = bytes.fromhex("02000000000202000000000108004500001c00010000401100000a0000010a0000020035176f00080000")
    info = lab_trace.FrameInfo.parse(frame)
    assert (info.src_ip, info.dst_ip, info.protocol, info.dport, info.kind) == (
        "10.0.0.1",
        "10.0.0.2",
        17,
        5999,
        "IPv4 UDP",
    )


def test_json_doc_names_every_field() -> None:
    doc = textwrap.dedent(TraceResult.__doc__ or "")
    result = TraceResult("l", "n", "eth0", "p", "s", 42, 1)
    for key in result.as_dict():
        assert f"``{key}``" in doc, key


def test_softirq_context_is_read_from_the_flags_column() -> None:
    fmt = tracefs.parse_format(
        "name: net_dev_queue\nID: 1\nformat:\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\n"
        'print fmt: "skbaddr=%p", REC->skbaddr\n',
        "net",
    )
    own = "          python-703     [000] b....  6936.635830: net_dev_queue: skbaddr=ffff888108767f00"
    lent = "          python-703     [000] b.s2.  6936.635877: net_dev_queue: skbaddr=ffff888108767300"
    first, second = (tracefs.parse_line(line, {"net_dev_queue": [fmt]}) for line in (own, lent))
    assert first is not None and second is not None
    assert (first.flags, first.in_interrupt) == ("b....", False)
    assert (second.flags, second.in_interrupt) == ("b.s2.", True)


def test_chain_builder_reports_chains_as_they_complete() -> None:
    builder = tracefs.ChainBuilder({"eth0"})
    assert builder.add(_ev(1.0, "net:net_dev_queue", "eth0", skb=1)) == []
    assert builder.add(_ev(1.1, "net:net_dev_queue", "eth0", skb=2)) == []
    done = builder.add(_ev(1.2, "skb:kfree_skb", None, skb=1, reason="NO_SOCKET"))
    assert [c.skbaddr for c in done] == [1] and len(done[0].events) == 2
    assert [c.skbaddr for c in builder.idle(before=1.5)] == [2]  # nothing more came: given up
    assert builder.open == {}


@ROOT
def test_an_interrupted_teardown_still_removes_the_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    session = tracefs.TraceSession(["skb:kfree_skb"])
    session.start()
    real = tracefs.session._rmdir_instance
    calls = []

    def interrupted_once(path: str) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C lands in the middle of the teardown
        real(path)

    monkeypatch.setattr(tracefs.session, "_rmdir_instance", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        session.stop()
    assert len(calls) == 2 and session.name not in tracefs.list_instances()
