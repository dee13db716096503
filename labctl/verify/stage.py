"""A check's stage and traffic: what is put in place, what is sent, all of it undone afterwards.

The stage guarantees, and why:

* **Temporary rules and sysctls** are applied on entry and, on exit, each
  touched node is put back to the topology's own rules and values, so the next
  check starts from the lab file, never from what an earlier check left.
* **Conntrack starts empty.**  Entries outlive a check (UDP: 30 s unreplied),
  and ``nat`` runs only for a flow's first packet: a flow an earlier check
  created would skip the nat table and count as an entry of this check.
* **A step that cannot do what it says is an error**, recorded in the
  evidence: the check is ERROR, never PASS on traffic that never left.

The traffic runs inside one :class:`~labctl.evidence.window.Window`; which
expectations are stated decides what the window records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_codes
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from labctl.evidence.model import Evidence, ExecEvidence, SendEvidence, SocketEvidence
from labctl.evidence.window import CaptureRequest, WalkRequest, Window, WindowSpec
from labctl.expect.base import JudgeContext, Needs
from labctl.kernel import ebtables, iptables, netns, nft, sysctl
from labctl.kernel.inject import inject
from labctl.kernel.sched import pinned
from labctl.kernel.sockets import UdpListener, send_udp
from labctl.kernel.sysfs import write_in_namespace
from labctl.kernel.tcp import TcpListener
from labctl.lab.traffic import PreparedFrame, TrafficError, prepare_injection
from labctl.topology.checks import Check, Listen, SendUdp, Traffic
from labctl.topology.model import Topology
from labctl.verify.judge import needs_of
from labctl.verify.steps import (
    exec_label,
    interface_features,
    run_exec,
    run_tcp,
    setup_execs,
    tcp_listener,
    tcp_socket_evidence,
)

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD


def trace_match(check: Check) -> str:
    """iptables match syntax that singles out the check's own packets for the hook trace."""
    if check.setup.hooks_match is not None:
        return check.setup.hooks_match
    for step in check.traffic:
        if step.udp is not None:
            return f"-p udp --dport {step.udp.port}"
        if step.tcp is not None:
            return f"-p tcp --dport {step.tcp.port}"
        if step.ping is not None:
            return "-p icmp"
        if step.inject is not None:
            return _match_of_packet(step.inject.packet)
    return ""


def _match_of_packet(expr: str) -> str:
    from labctl.traffic.expr import ExprError, parse_packet

    try:
        pkt = parse_packet(expr)
    except ExprError:
        return ""
    for name, proto in (("UDP", "udp"), ("TCP", "tcp")):
        if pkt.haslayer(name):
            dport = pkt[name].fields.get("dport")
            return f"-p {proto} --dport {dport}" if isinstance(dport, int) else f"-p {proto}"
    if pkt.haslayer("ICMP") or pkt.haslayer("ICMPv6EchoRequest"):  # ip6tables: echo requests (not ND)
        return "-p icmp"
    return ""


def window_spec(check: Check, needs: Needs) -> WindowSpec:
    match = trace_match(check)
    return WindowSpec(
        events=tuple(sorted(needs.events)),
        captures=[CaptureRequest(c.node, c.interface, c.filter) for c in check.setup.capture],
        walks={
            node: WalkRequest(w.bridge_tables, w.nat, match, w.nft, w.ip, ip6=w.ip6) for node, w in needs.walks.items()
        },
        rules=set(getattr(check.expect, "rules") or {}),  # noqa: B009 - the model is built from the registry
        ebtables=set(getattr(check.expect, "ebtables") or {}),  # noqa: B009
        ip6tables=set(getattr(check.expect, "ip6tables") or {}),  # noqa: B009
        nft=set(getattr(check.expect, "nft") or {}),  # noqa: B009
        fdb=needs.fdb,
        conntrack=needs.conntrack,
        routes=set(needs.routes),
        # flushed by the window once it records: a bridge re-taught between a flush and the window's start
        # (a neighbour's ARP probe) would learn nothing the window could see
        fdb_flush=tuple((node, bridge) for node, _, bridge in (r.partition(":") for r in check.setup.fdb_flush)),
    )


def _ns(topo: Topology, node: str) -> str:
    return netns.namespace_name(topo.name, node)


def flush_conntrack(namespace: str) -> None:
    """Empty the conntrack table of ``namespace`` (the thread stays inside while pyroute2 opens its socket)."""
    from pyroute2.conntrack import Conntrack

    with netns.entered(namespace):
        ct = Conntrack()
        try:
            ct.flush()
        finally:
            ct.close()


@contextlib.contextmanager
def temporary_rules(topo: Topology, check: Check) -> Iterator[None]:
    """Apply the check's rules on an empty conntrack table; afterwards restore the topology's rules."""
    touched_ip = list(check.setup.iptables)
    touched_ip6 = list(check.setup.ip6tables)
    touched_eb = list(check.setup.ebtables)
    touched_nft: list[str] = []
    try:
        for node in topo.nodes:
            flush_conntrack(_ns(topo, node))
        for node, rules in check.setup.iptables.items():
            iptables.apply_rules(_ns(topo, node), rules)
        for node, rules in check.setup.ip6tables.items():
            iptables.apply_rules(_ns(topo, node), rules, "ip6")
        for node, rules in check.setup.ebtables.items():
            ebtables.apply_rules(_ns(topo, node), rules)
        for node, commands in check.setup.nftables.items():
            touched_nft.append(node)
            nft.apply_commands(_ns(topo, node), commands)
        yield
    finally:
        for node in touched_ip:  # the node's own rules again, each table swapped whole (never open between)
            iptables.replace_rules(_ns(topo, node), topo.nodes[node].iptables)
        for node in touched_ip6:
            iptables.replace_rules(_ns(topo, node), topo.nodes[node].ip6tables, "ip6")
        for node in touched_eb:
            if topo.nodes[node].ebtables:
                ebtables.replace_rules(_ns(topo, node), topo.nodes[node].ebtables)
            else:
                ebtables.flush(_ns(topo, node))  # tables only the check made go
        for node in touched_nft:  # the node's own ruleset again, in one transaction (ebtables' tables kept)
            nft.replace(_ns(topo, node), topo.nodes[node].nftables or "", keep_ebtables=True)


def _napi_threads() -> dict[int, str]:
    """pid -> name of every NAPI kernel thread (``napi/eth0-8193``) on the host."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/comm") as f:
                    name = f.read().strip()
                if name.startswith("napi/"):
                    found[int(entry)] = name
    return found


@contextlib.contextmanager
def threaded_napi(topo: Topology, check: Check) -> Iterator[None]:
    """Switch the named interfaces' NAPI to a kernel thread for the check; back to softirq afterwards.

    ``node:iface@CPU`` also pins that thread to CPU: with the sender on the same CPU the thread polls only
    when the sender yields, so it finds batches to merge (on its own CPU it may poll after every packet).
    The thread is the one that appeared when threading was switched on, named after the interface.
    """
    done: list[tuple[str, str]] = []
    try:
        for ref in check.setup.napi_threaded:
            where, _, cpu = ref.partition("@")
            node, _, ifname = where.partition(":")
            before = _napi_threads()
            write_in_namespace(_ns(topo, node), f"class/net/{ifname}/threaded", "1")
            done.append((node, ifname))
            if cpu:
                new = [pid for pid, name in _napi_threads().items()
                       if pid not in before and name.startswith(f"napi/{ifname}-")]
                for pid in new:
                    os.sched_setaffinity(pid, {int(cpu)})
                    # lowest priority: it does not preempt the sender at every wake-up, so batches build
                    os.setpriority(os.PRIO_PROCESS, pid, 19)
        yield
    finally:
        for node, ifname in reversed(done):
            with contextlib.suppress(OSError):
                write_in_namespace(_ns(topo, node), f"class/net/{ifname}/threaded", "0")


@contextlib.contextmanager
def temporary_sysctls(topo: Topology, check: Check) -> Iterator[None]:
    saved: list[tuple[str, str, str]] = []
    try:
        for node, settings in check.setup.sysctls.items():
            ns = _ns(topo, node)
            for key, value in settings.items():
                saved.append((ns, key, sysctl.read(key, ns)))
                sysctl.write_many({key: sysctl.format_value(value)}, ns)
        yield
    finally:
        for ns, key, old in reversed(saved):
            with contextlib.suppress(sysctl.SysctlError):
                sysctl.write_many({key: old}, ns)


def _listener(topo: Topology, spec: Listen) -> UdpListener | TcpListener:
    """The check's listener; one that cannot be made is the check's ERROR, with the kernel's reason."""
    try:
        if spec.proto == "tcp":
            return tcp_listener(topo, spec)
        return UdpListener(
            _ns(topo, spec.node),
            spec.port,
            addr=spec.address.strip("[]"),
            rcvbuf=spec.rcvbuf,
            read=spec.read,
            socket_filter=spec.filter,
        )
    except OSError as exc:
        raise TrafficError(
            f"listen on {spec.node} {spec.proto} {spec.address} port {spec.port}: {exc.strerror or exc}"
        ) from exc


@dataclass
class _Step:
    traffic: Traffic
    frame: PreparedFrame | None = None


def _ethertype(frame: bytes) -> int:
    return int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0


def _ip_protocol(address: str) -> int:
    return ETH_P_IPV6 if ":" in address else ETH_P_IP


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")


def _send_udp(topo: Topology, spec: SendUdp, window: Window, errors_expected: bool) -> None:
    """One udp step; a socket that cannot be made or a send the kernel refuses is an ERROR of the check.

    Refused sends are evidence only when the check states what the sender must get (``send_error``):
    EPERM from an OUTPUT drop is then the claim.  Otherwise a send that failed means the traffic the
    check is about never left, and passing on it would be hope, not evidence.
    """
    payload = spec.payload.encode()
    if spec.size is not None:
        payload = (payload * (spec.size // max(len(payload), 1) + 1))[: spec.size]
    try:
        with pinned(spec.cpu):
            result = send_udp(_ns(topo, spec.node), spec.host, spec.port, payload, count=spec.count,
                              gso_size=spec.gso_size, dont_fragment=spec.df)
    except OSError as exc:
        window.error(f"udp from {spec.node} to {spec.to}: no socket ({exc})")
        window.record_send(SendEvidence(spec.node, "udp", spec.count, 0, (_errno_name(exc.errno),)))
        return
    errors = tuple(sorted({_errno_name(code) for code in result.errors}))
    window.record_send(SendEvidence(spec.node, "udp", spec.count, result.sent, errors))
    if errors and not errors_expected:
        window.error(
            f"udp from {spec.node} to {spec.to}: {result.failed} of {spec.count} sends failed ({', '.join(errors)});"
            " state send_error if that is the claim"
        )


def _errno_name(code: int | None) -> str:
    if code is None:
        return "EIO"
    return errno_codes.errorcode.get(code, f"errno {code}")


def _send(
    topo: Topology,
    index: int,
    step: _Step,
    window: Window,
    errors_expected: bool = False,
    tcp_errno_stated: bool = False,
) -> None:
    traffic = step.traffic
    if traffic.exec is not None:
        run_exec(topo, exec_label(index), traffic.exec, window)
    elif traffic.tcp is not None:
        run_tcp(topo, traffic.tcp, window, tcp_errno_stated)
    elif traffic.inject is not None and step.frame is not None:
        spec = traffic.inject
        try:
            with pinned(spec.cpu):
                sent = inject(step.frame.namespace, step.frame.ifname, step.frame.frame, spec.count, spec.rate)
        except OSError as exc:
            window.error(f"inject on {spec.node}:{step.frame.ifname} failed: {exc}")
            sent = 0
        window.record_send(SendEvidence(spec.node, "inject", spec.count, sent))
    elif traffic.udp is not None:
        _send_udp(topo, traffic.udp, window, errors_expected)
    elif traffic.ping is not None:
        spec_p = traffic.ping
        proc = netns.popen(_ns(topo, spec_p.node), spec_p.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        window.add_tasks([proc.pid])  # its echo requests are the lab's too
        out, err = proc.communicate()
        counts = _PING_COUNTS.search(out or "")
        refused = [line for line in (err or "").splitlines() if "local error" in line]
        if proc.returncode not in (0, 1) or counts is None:
            reason = (err or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            window.error(f"ping {spec_p.to} from {spec_p.node} could not run: {reason[0]}")
            window.record_send(SendEvidence(spec_p.node, "ping", spec_p.count, 0, replies=0))
        else:
            sent = max(0, int(counts[1]) - len(refused))
            window.record_send(SendEvidence(spec_p.node, "ping", spec_p.count, sent, replies=int(counts[2])))
            if refused:  # ping counts them as transmitted; they never left the node
                window.error(
                    f"ping {spec_p.to} from {spec_p.node}: {len(refused)} echo requests refused by the node's own"
                    f" stack ({refused[0].removeprefix('ping: ').strip()})"
                )
    with window.draining():  # a settle (an ARP timing out) is long enough for a busy host to fill the ring
        window.settle(traffic.settle)  # a stated settle is a fixed wait; else until the lab is quiet


def warm_neighbours(topo: Topology, check: Check) -> None:
    """Resolve each udp destination's next hop before the window (best effort: an unanswered ping is fine)."""
    if not check.setup.warm_neighbours:
        return
    for node, to in dict.fromkeys(
        (t.node, s.host) for t in check.traffic for s in (t.udp, t.tcp) if s
    ):
        if to.startswith("127.") or to == "::1":
            continue
        netns.run(
            _ns(topo, node),
            ["ping", "-n", "-q", "-c", "1", "-W", "1", to],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


def observe(topo: Topology, check: Check) -> tuple[Evidence, JudgeContext]:
    """Stage the check, send its traffic inside one window, undo the stage; the evidence and its context."""
    needs = needs_of(check)
    steps = [
        _Step(t, prepare_injection(topo, t.inject.node, t.inject.interface, t.inject.packet) if t.inject else None)
        for t in check.traffic
    ]
    protocols = set()
    for step in steps:
        if step.frame is not None:
            protocols.add(_ethertype(step.frame.frame))
        elif step.traffic.udp is not None or step.traffic.tcp is not None:
            sender = step.traffic.udp or step.traffic.tcp
            assert sender is not None
            protocols.add(_ip_protocol(sender.host))
        elif step.traffic.ping is not None:
            protocols.add(_ip_protocol(step.traffic.ping.to))
    warm_neighbours(topo, check)  # before the stage: its conntrack flush forgets the warm-up's flows
    execs: list[ExecEvidence] = []
    stage_errors: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(temporary_sysctls(topo, check))
        stack.enter_context(temporary_rules(topo, check))
        stack.enter_context(threaded_napi(topo, check))
        stack.enter_context(interface_features(topo, check, stage_errors))
        stack.enter_context(setup_execs(topo, check, execs, stage_errors))
        listeners: list[tuple[Listen, UdpListener | TcpListener]] = []
        for spec in check.setup.listen:
            listener = _listener(topo, spec)
            stack.callback(listener.close)
            listeners.append((spec, listener))
        window = stack.enter_context(Window(topo, window_spec(check, needs)))
        for _, listener in listeners:  # a datagram its reader thread has not taken yet is still on its way
            if isinstance(listener, UdpListener) and listener.read:
                window.busy_while(_unread(listener))
        for error in stage_errors:
            window.error(error)
        errors_expected = getattr(check.expect, "send_error") is not None  # noqa: B009 - registry-built model
        tcp_stated = getattr(check.expect, "tcp")  # noqa: B009 - the model is built from the registry
        tcp_errno_stated = tcp_stated is not None and tcp_stated.errno is not None
        if not stage_errors:  # never traffic on a stage that is not in place
            for index, step in enumerate(steps):
                _send(topo, index, step, window, errors_expected, tcp_errno_stated)
        window.record_sockets(_socket_evidence(spec, listener) for spec, listener in listeners)
        evidence = window.close()
    # the setup's exec steps and their undo ran outside the window: their results join its evidence
    if execs or stage_errors:
        undo = [x for x in execs if x.label.startswith("undo ")]
        evidence = dataclasses.replace(
            evidence,
            execs=(*[x for x in execs if x not in undo], *evidence.execs, *undo),
            errors=evidence.errors + tuple(e for e in stage_errors if e not in evidence.errors),
        )
    return evidence, JudgeContext(traffic_protocols=frozenset(protocols))


def _unread(listener: UdpListener) -> Callable[[], bool]:
    return lambda: listener.stats().queued_bytes > 0


def _socket_evidence(spec: Listen, listener: UdpListener | TcpListener) -> SocketEvidence:
    if isinstance(listener, TcpListener):
        return tcp_socket_evidence(spec, listener)
    stats = listener.stats()
    received = listener.received()
    return SocketEvidence(
        node=spec.node,
        port=spec.port,
        received=len(received),
        received_bytes=sum(len(payload) for payload, _ in received),
        queued_bytes=stats.queued_bytes,
        drops=stats.drops,
        sources=tuple(source for _, (source, _port) in received),
    )


__all__ = ["TrafficError", "observe"]
