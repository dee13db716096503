"""A running lab as the traffic commands see it: names resolved, input checked.

``inject``, ``send``, ``listen`` and ``capture`` all start from words a user
typed -- a lab, ``NODE[:IFACE]``, ``ADDR:PORT``, a packet expression, a
filter -- and each word can be wrong in its own way.  Everything here turns
those words into kernel handles (a namespace, an interface that exists in
it) or into a :class:`~labctl.errors.LabctlError` that says what was wrong
and what would be right, *before* any socket is opened.  Bad input exits 2,
like a bad lab file; what the kernel refuses later exits 1.

The topology of a running lab comes from the file it was brought up from
(recorded in its state), because injection needs the lab's addresses and
MACs (:func:`labctl.lab.traffic.prepare_injection`); the kernel stays the
authority on what exists right now (namespaces, interfaces).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import time
from dataclasses import dataclass, field

from labctl.errors import LabctlError, LabNotUpError
from labctl.kernel import netns
from labctl.kernel.bpf import CaptureError, compile_filter
from labctl.kernel.inject import InjectError, Injector
from labctl.kernel.links import NodeLinks
from labctl.lab import state
from labctl.lab.traffic import PreparedFrame, TrafficError, prepare_injection
from labctl.topology.model import Topology
from labctl.traffic.expr import ExprError, parse_packet


class TargetError(LabctlError):
    """A node, interface or address the user named does not exist or is malformed."""

    exit_code = 2


class FilterError(LabctlError):
    """A capture or socket filter libpcap (or the socket layer) cannot use; libpcap's words."""

    exit_code = 2


class SendError(LabctlError):
    """The kernel refused the frame itself (EMSGSIZE, device gone): retrying cannot help."""


# ---------------------------------------------------------------- the lab


@dataclass(frozen=True)
class LiveLab:
    """A lab that is up: its topology (from its file) and notes about that file."""

    name: str
    file: str
    topo: Topology
    warnings: tuple[str, ...] = ()

    def namespace(self, node: str) -> str:
        """The node's namespace; unknown node and missing namespace are told apart."""
        if node not in self.topo.nodes:
            raise TargetError(f"lab {self.name} has no node {node!r} (nodes: {', '.join(sorted(self.topo.nodes))})")
        name = netns.namespace_name(self.name, node)
        if not netns.exists(name):
            raise LabNotUpError(
                f"node {node} of lab {self.name} is not up (no namespace {name}); run labctl up {self.file}"
            )
        return name

    def target(self, spec: str, *, allow_iface: bool = True) -> Target:
        """Resolve ``NODE[:IFACE]``; the interface must exist in the node's namespace now."""
        node, ifname = parse_target(spec)
        if ifname is not None and not allow_iface:
            raise TargetError(
                f"{spec!r}: this command uses the node's own socket and routing; name the node only ({node})"
            )
        namespace = self.namespace(node)
        if ifname is not None:
            present = interfaces(namespace)
            if ifname not in present:
                raise TargetError(f"node {node} has no interface {ifname!r} (it has: {', '.join(present)})")
        return Target(lab=self, node=node, namespace=namespace, ifname=ifname)


@dataclass(frozen=True)
class Target:
    """A node, and optionally one of its interfaces, of a running lab."""

    lab: LiveLab
    node: str
    namespace: str
    ifname: str | None = None

    @property
    def label(self) -> str:
        return f"{self.node}:{self.ifname}" if self.ifname else self.node


def interfaces(namespace: str) -> list[str]:
    """Interface names the kernel has in ``namespace`` (``lo`` last: rarely the one meant)."""
    with NodeLinks(namespace) as handle:
        names = list(handle.links())
    return sorted(names, key=lambda name: (name == "lo", name))


def open_lab(name: str, file: str | None = None) -> LiveLab:
    """The running lab ``name``; ``file`` (when the user gave one) overrides the recorded file.

    A lab is up when its namespaces exist -- state is a convenience that a
    crash may have lost, in which case the lab file must be named instead.
    """
    from labctl.lab.state import digest

    if not netns.list_labctl(name):
        from labctl.lab.status import running_labs

        up = ", ".join(running_labs()) or "none"
        raise LabNotUpError(f"lab {name} is not up (labs up: {up}); run labctl up FILE first")
    saved = state.load(name)
    source = file or (saved.file if saved else None)
    if source is None:
        raise LabNotUpError(f"lab {name} has namespaces but no state (was its up interrupted?); name its lab file")
    if not os.path.exists(source):
        raise LabNotUpError(f"lab {name} was brought up from {source}, which is gone; name its lab file")
    topo = _load_topology(source)
    if topo.name != name:
        raise TargetError(f"{source} defines lab {topo.name}, not {name}")
    warnings: list[str] = []
    if saved is not None and saved.digest and digest(topo) != saved.digest:
        warnings.append(f"{source} changed since labctl up; addresses come from the file, run labctl up to converge")
    if saved is not None and saved.status != "up":
        warnings.append(f"lab {name} is {saved.status} (an up may still be running or was interrupted)")
    return LiveLab(name=name, file=source, topo=topo, warnings=tuple(warnings))


def _load_topology(file: str) -> Topology:
    """The file as ``up`` read it (a verification lab's ``checks`` included), by the same loader.

    Its shape and references are checked again (every error ``file:line: key``: the file may have been
    edited since ``up``); what ``up`` asked of this machine is not asked again -- the lab is up, so the
    kernel took it, and those questions (tracepoint and counter names, sysctls in a scratch namespace,
    rule and nft parsing) cost a lab with checks 0.05-0.4 s that no live command needs.
    """
    from labctl.topology.loader import load_file
    from labctl.topology.model import LabFile

    return load_file(file, LabFile)[0]


def parse_target(spec: str) -> tuple[str, str | None]:
    """``c1`` -> ``('c1', None)``; ``c1:eth0`` -> ``('c1', 'eth0')``."""
    node, sep, ifname = spec.partition(":")
    if not node or (sep and not ifname) or ":" in ifname:
        raise TargetError(f"{spec!r}: expected NODE or NODE:IFACE (e.g. c1 or c1:eth0)")
    return node, ifname or None


def parse_endpoint(spec: str, *, listening: bool = False) -> tuple[str, int]:
    """``10.0.0.2:5000``, ``[2001:db8::2]:5000`` (or ``:5000`` when listening: any address) as (address, port).

    Names are refused: resolving them would use the host's resolver, which
    knows nothing of the lab.
    """
    host, sep, port_text = spec.rpartition(":")
    example = ":5000, 10.0.0.2:5000 or [::]:5000" if listening else "10.0.0.2:5000 or [2001:db8::2]:5000"
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TargetError(f"{spec!r}: expected ADDRESS:PORT with a port 1-65535 (e.g. {example})")
    if not host:
        if not listening:
            raise TargetError(f"{spec!r}: a destination needs an address (e.g. {example})")
        host = "0.0.0.0"
    if host.startswith("[") and host.endswith("]"):
        return parse_address(host[1:-1], spec, version=6), int(port_text)
    return parse_address(host, spec, version=4), int(port_text)  # IPv6 is written [ADDR]:PORT


def parse_address(text: str, spec: str | None = None, version: int | None = None) -> str:
    """An IPv4 or IPv6 address literal (``version`` to demand one); ``spec`` is what the user typed."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or (version is not None and address.version != version):
        kind = {4: "an IPv4", 6: "an IPv6"}.get(version or 0, "an IP")
        raise TargetError(f"{spec or text!r}: {text!r} is not {kind} address (names are not resolved)") from None
    return str(address)


def check_capture_filter(expr: str | None) -> None:
    """Compile the tcpdump expression once now so a typo is bad input, not a failed capture."""
    if expr:
        try:
            compile_filter(expr)
        except CaptureError as exc:
            raise FilterError(str(exc)) from None


def check_socket_filter(expr: str | None) -> None:
    """Same for a UDP socket filter (``drop-all`` or tcpdump syntax on the IP header)."""
    from labctl.kernel.sockets import SocketFilterError, udp_socket_filter

    if expr:
        try:
            udp_socket_filter(expr)
        except (CaptureError, SocketFilterError) as exc:
            raise FilterError(str(exc)) from None


def prepare(target: Target, expr: str) -> PreparedFrame:
    """The frame ``expr`` describes, completed from the lab; a bad token gets a caret under it."""
    try:
        parse_packet(expr)
    except ExprError as exc:
        caret = "\n".join("  " + line for line in exc.caret().splitlines())
        raise TrafficError(f"bad packet expression: {exc}\n{caret}") from None
    return prepare_injection(target.lab.topo, target.node, target.ifname, expr)


# ---------------------------------------------------------------- stopping


class Stop:
    """A request to end a command early, set from a signal handler.

    A plain flag on purpose: a handler runs in the main thread between two
    bytecodes, so if it took a lock (``threading.Event.set``) that the
    interrupted code was holding, the process would deadlock.  ``wait``
    sleeps in short slices, so a request is seen within ``SLICE`` seconds.
    """

    SLICE = 0.02

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str = "signal") -> None:
        self.reason = self.reason or reason

    def is_set(self) -> bool:
        return self.reason is not None

    def wait(self, timeout: float | None) -> bool:
        """Sleep up to ``timeout`` seconds (None: until set); True when stop was requested."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = self.SLICE if deadline is None else min(self.SLICE, deadline - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
        return self.is_set()


# ---------------------------------------------------------------- sending frames


@dataclass
class InjectResult:
    """What one inject did: frames the kernel accepted, refusals by errno, pace achieved."""

    summary: str
    node: str
    ifname: str
    length: int
    requested: int
    sent: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0
    interrupted: bool = False

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def pps(self) -> float:
        """Frames per second between the first frame and the last (0 for a single frame)."""
        return (self.sent - 1) / self.elapsed if self.sent > 1 and self.elapsed > 0 else 0.0

    def error_names(self) -> dict[str, int]:
        """``{'ENOBUFS': 12}``; errno 0 means sendmmsg refused a frame without saying why."""
        return {errno_name(code): n for code, n in sorted(self.errors.items())}


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, "unreported" if code == 0 else str(code))


def send_frames(
    frame: PreparedFrame,
    node: str,
    count: int,
    rate: float | None = None,
    stop: Stop | None = None,
) -> InjectResult:
    """Send ``frame`` ``count`` times, in slices so that ``stop`` ends a long run promptly.

    A slice is at most ~0.1 s of frames at ``rate`` (or 16384 frames unpaced),
    so Ctrl-C or SIGTERM is honoured within that time and the report still
    counts every frame that went out.
    """
    result = InjectResult(frame.summary, node, frame.ifname, len(frame.frame), count)
    stop = stop or Stop()
    chunk = 16384 if rate is None else max(1, int(rate / 10))
    try:
        with Injector(frame.namespace, frame.ifname) as injector:
            # timed from the first frame to the last: socket setup and teardown
            # (closing a packet socket waits for an RCU grace period) are not sending
            start = time.perf_counter()
            attempted = 0
            while attempted < count:
                # each slice is paced from its own first frame: wait for that frame's slot
                delay = start + attempted / rate - time.perf_counter() if rate else 0.0
                if stop.wait(delay) if delay > 0 else stop.is_set():
                    result.interrupted = True
                    break
                n = min(chunk, count - attempted)
                result.sent += injector.send(frame.frame, n, rate)
                for code, k in injector.errors.items():
                    result.errors[code] = result.errors.get(code, 0) + k
                attempted += n
                result.elapsed = time.perf_counter() - start
    except InjectError as exc:
        raise SendError(f"{exc} (a frame of {len(frame.frame)} bytes)") from None
    return result
