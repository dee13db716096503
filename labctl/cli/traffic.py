"""Traffic commands: inject, send, listen, capture -- a running lab's packets by hand.

``inject`` writes a frame onto a node's interface with AF_PACKET (the node's
stack never sees it leave; a VM's frame goes out its tap to the relay);
``send`` uses the node's own UDP socket, so routing, netfilter and the
neighbour layer run and their errno is the answer; ``listen`` is the
receiving application, with the socket knobs that decide drops at the end
of the receive path; ``capture`` is tcpdump inside a node, and says when the
kernel dropped frames the capture could not keep (an incomplete capture is
not evidence).

Conventions: bad input (unknown node or interface, bad expression, filter or
address) exits 2; what the kernel refused exits 1; ``listen`` and
``capture`` stop cleanly on Ctrl-C *and* SIGTERM (sockets closed, pcap
written, statistics printed); ``inject`` stopped early reports what it sent
and exits 130.  Frame and datagram lines go to stdout as they come (plain
text or JSON lines); the closing statistics of ``listen``/``capture`` go to
stderr in text mode, like tcpdump's, so stdout pipes cleanly.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from labctl.cli.common import console, err_console, escape, print_json, reports_errors, require_root, up_lab_name

if TYPE_CHECKING:
    from labctl.kernel.packet import Frame
    from labctl.lab.live import LiveLab, Stop

LabArg = Annotated[str, typer.Argument(metavar="LAB", help="lab name, or the lab file that defines it")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output (JSON lines for listen and capture)")]
CountOpt = Annotated[int, typer.Option("--count", "-n", min=1, help="how many")]
PREVIEW_BYTES = 32
POLL = 0.05  # seconds between looks at what a background reader collected


class Proto(StrEnum):
    """Transport of send/listen; only UDP for now (the notes' socket experiments are UDP)."""

    udp = "udp"


# ---------------------------------------------------------------- shared


def _open(lab: str) -> LiveLab:
    """Resolve LAB (name or file) to the running lab; print notes about its file."""
    require_root()
    name = up_lab_name(lab)  # before live's imports (Scapy): a typo is answered at once

    from labctl.lab.live import open_lab

    live = open_lab(name, file=lab if name != lab else None)
    for warning in live.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True, highlight=False)
    return live


@contextlib.contextmanager
def _stopping() -> Iterator[Stop]:
    """Ctrl-C and SIGTERM request a clean stop (sockets closed, results printed).

    A second signal raises KeyboardInterrupt, for a user who does not want
    to wait.  Handlers can only be installed from the main thread; elsewhere
    (a test calling the command in a thread) the defaults stay.
    """
    from labctl.lab.live import Stop

    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _line(text: str) -> None:
    """One streamed line, flushed: a pipe reader sees each frame as it comes."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _json_line(data: dict[str, Any]) -> None:
    _line(json.dumps(data, default=str))


def _say(text: str, *, err: bool = False) -> None:
    """Rich text that never wraps (CliRunner and pipes would cut it at 80 columns)."""
    (err_console if err else console).print(text, soft_wrap=True, highlight=False)


def _preview(payload: bytes) -> str:
    text = repr(payload[:PREVIEW_BYTES])
    return text + "…" if len(payload) > PREVIEW_BYTES else text


def _errno_list(errors: dict[str, int]) -> str:
    """``EPERM ×2 (Operation not permitted)`` for each errno."""
    parts = []
    for name, n in errors.items():
        code = getattr(errno, name, None)
        why = f" ({os.strerror(code)})" if isinstance(code, int) else ""
        parts.append(f"{name} ×{n}{why}")
    return ", ".join(parts)


def _kernel_error(what: str, exc: OSError) -> Exception:
    from labctl.errors import KernelError

    name = errno.errorcode.get(exc.errno or 0, "")
    return KernelError(f"{what}: {name} {exc.strerror or exc}".strip())


# ---------------------------------------------------------------- inject


def inject(
    lab: LabArg,
    target: Annotated[str, typer.Argument(metavar="NODE[:IFACE]", help="node, and the interface to send on")],
    expr: Annotated[str, typer.Argument(metavar="PACKET", help="Scapy expression, e.g. \"IP(dst='10.0.0.2')/UDP()\"")],
    count: CountOpt = 1,
    rate: Annotated[float | None, typer.Option("--rate", min=0.001, help="frames/s (default: flat out)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Put a frame on a node's interface (AF_PACKET: the node's stack is skipped).

    Unset MACs and the source address are taken from the lab and the node's
    route to the destination, as the node's stack would have chosen them.
    Without :IFACE the routed interface (or the node's only one) is used; a
    VM node's frame leaves through its tap and reaches the host via the relay.
    """
    from labctl.lab.live import prepare, send_frames

    live = _open(lab)
    node = live.target(target)
    frame = prepare(node, expr)
    with _stopping() as stop:
        result = send_frames(frame, node.node, count, rate, stop)
    where = f"{result.node}:{result.ifname}"
    if as_json:
        print_json(
            {
                "summary": result.summary,
                "node": result.node,
                "interface": result.ifname,
                "length": result.length,
                "requested": result.requested,
                "sent": result.sent,
                "failed": result.failed,
                "errors": result.error_names(),
                "seconds": round(result.elapsed, 6),
                "pps": round(result.pps, 1),
                "interrupted": result.interrupted,
            }
        )
    else:
        pace = f"in {result.elapsed * 1000:.1f} ms ({result.pps:,.0f} pps)" if result.sent > 1 else ""
        sent = f"sent {result.sent}/{result.requested} × {escape(result.summary)}"
        _say(f"{sent} ({result.length} bytes) on {where} {pace}".rstrip())
        if result.failed:
            _say(f"[yellow]refused {result.failed}:[/] {_errno_list(result.error_names())}")
        if result.interrupted:
            _say(f"[yellow]stopped by {stop.reason}[/]", err=True)
    if result.interrupted:
        raise typer.Exit(130)
    if result.failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------- send


def send(
    lab: LabArg,
    node: Annotated[str, typer.Argument(metavar="NODE", help="the sending node")],
    proto: Annotated[Proto, typer.Argument(metavar="PROTO", help="udp")],
    destination: Annotated[str, typer.Argument(metavar="ADDR:PORT", help="e.g. 10.0.0.2:5000")],
    payload: Annotated[str, typer.Option("--payload", help="datagram payload (UTF-8)")] = "labctl",
    count: CountOpt = 1,
    sport: Annotated[int | None, typer.Option("--sport", min=1, max=65535, help="source port")] = None,
    src: Annotated[str | None, typer.Option("--src", help="source address (must be the node's)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Send datagrams from the node's own socket, through its routing, netfilter and qdisc.

    A refused datagram is evidence (EPERM: an OUTPUT DROP; ENETUNREACH: no
    route), so every errno is counted and named; exit 1 when any failed.
    """
    from labctl.kernel.sockets import send_udp
    from labctl.lab.live import errno_name, parse_address, parse_endpoint

    live = _open(lab)
    where = live.target(node, allow_iface=False)
    dst, dport = parse_endpoint(destination)
    if src is not None:
        src = parse_address(src)
    data = payload.encode()
    try:
        result = send_udp(where.namespace, dst, dport, data, count=count, sport=sport, src=src)
    except OSError as exc:  # no socket of that family (IPv6 off in the node)
        raise _kernel_error(f"cannot send udp to {destination} from {where.node}", exc) from None
    errors = {errno_name(code): n for code, n in sorted(result.errors.items())}
    if as_json:
        print_json(
            {
                "node": where.node,
                "protocol": proto.value,
                "destination": f"{dst}:{dport}",
                "length": len(data),
                "sent": result.sent,
                "failed": result.failed,
                "errors": errors,
            }
        )
    else:
        sent = f"sent {result.sent}/{count} {proto.value} datagrams"
        _say(f"{sent} from {where.node} to {dst}:{dport} ({len(data)} bytes each)")
        if result.failed:
            _say(f"[red]failed {result.failed}:[/] {_errno_list(errors)}")
    if result.failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------- listen


def listen(
    lab: LabArg,
    node: Annotated[str, typer.Argument(metavar="NODE", help="the receiving node")],
    proto: Annotated[Proto, typer.Argument(metavar="PROTO", help="udp")],
    address: Annotated[str, typer.Argument(metavar="[ADDR]:PORT", help=":5000 (any address) or 10.0.0.2:5000")],
    rcvbuf: Annotated[int | None, typer.Option("--rcvbuf", min=1, help="SO_RCVBUFFORCE bytes (kernel doubles)")] = None,
    no_read: Annotated[bool, typer.Option("--no-read", help="never read: let the queue fill, then report it")] = False,
    socket_filter: Annotated[
        str | None, typer.Option("--filter", help="socket filter: drop-all, or tcpdump syntax on the IP header")
    ] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="stop after this many seconds")] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="stop after this many datagrams")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Be the receiving application: print each datagram, then the socket's queue and drops.

    Runs until --count datagrams, --timeout, Ctrl-C or SIGTERM.  With
    --no-read the socket is held open unread (until --timeout or a signal),
    so a small --rcvbuf overflows and the drops show at the end.
    """
    from labctl.kernel.sockets import UdpListener
    from labctl.lab.live import check_socket_filter, parse_endpoint

    if no_read and count is not None:
        raise typer.BadParameter("--count needs reading; drop --no-read or use --timeout", param_hint="--count")
    live = _open(lab)
    where = live.target(node, allow_iface=False)
    addr, port = parse_endpoint(address, listening=True)
    check_socket_filter(socket_filter)
    shown = 0
    with _stopping() as stop:
        try:
            listener = UdpListener(
                where.namespace, port, addr, rcvbuf=rcvbuf, read=not no_read, socket_filter=socket_filter
            )
        except OSError as exc:
            raise _kernel_error(f"cannot listen on udp {addr}:{port} in {where.node}", exc) from None
        with listener:
            how = "holding the socket unread" if no_read else "listening"
            _say(f"{how} on {where.node} {proto.value} {addr}:{port}; Ctrl-C to stop", err=True)
            deadline = None if timeout is None else time.monotonic() + timeout
            reason = "signal"
            while True:
                if not no_read:
                    for payload, (source, sport) in listener.received()[shown : count or None]:
                        shown += 1
                        if as_json:
                            _json_line(
                                {
                                    "type": "datagram",
                                    "source": f"{source}:{sport}",
                                    "length": len(payload),
                                    "payload": _preview(payload),
                                }
                            )
                        else:
                            _line(f"{source}:{sport}  {len(payload)} bytes  {_preview(payload)}")
                if count is not None and shown >= count:
                    reason = "count"
                    break
                left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
                if stop.wait(max(left, 0)):
                    reason = stop.reason or "signal"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    reason = "timeout"
                    break
            stats = listener.stats()
    report = {
        "type": "stats",
        "read": stats.received,
        "queued_bytes": stats.queued_bytes,
        "rcvbuf": stats.rcvbuf,
        "drops": stats.drops,
        "stopped_by": reason,
    }
    if as_json:
        _json_line(report)
        return
    drops = f"[yellow]{stats.drops} drops[/]" if stats.drops else "0 drops"
    _say(
        f"{where.node} {proto.value} {addr}:{port}: {stats.received} datagrams read, {stats.queued_bytes} bytes"
        f" still queued (rcvbuf {stats.rcvbuf}), {drops}; stopped by {reason}",
        err=True,
    )


# ---------------------------------------------------------------- capture

RING_SHARE = 4
"""A capture ring may take at most 1/RING_SHARE of the memory available now (it is pinned kernel memory)."""


def ring_bytes(buffer_kib: int) -> int:
    """The ring size for ``-B KIB``, page-aligned, refused (exit 2) when the machine cannot spare it.

    The ring is kernel memory that cannot be swapped: 1 GiB takes 1 GB at
    once, and a size beyond the machine's memory stalls the allocation
    instead of failing, so the bound is checked before any socket exists.
    """
    from labctl.lab.live import TargetError

    available = _mem_available()
    if available is None:
        return max(4096, buffer_kib * 1024 // 4096 * 4096)
    limit_kib = max(4, available // RING_SHARE // 1024)
    if buffer_kib > limit_kib:
        raise TargetError(
            f"-B {buffer_kib} KiB is more than this machine can give a capture ring: at most {limit_kib} KiB"
            f" (a quarter of the {available // (1 << 20)} MiB available now)"
        )
    return max(4096, buffer_kib * 1024 // 4096 * 4096)


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None when the kernel does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None



def capture(
    lab: LabArg,
    target: Annotated[str, typer.Argument(metavar="NODE[:IFACE]", help="node (all its interfaces) or one interface")],
    bpf: Annotated[str | None, typer.Option("-f", "--filter", help="tcpdump filter, e.g. 'udp port 5000'")] = None,
    write: Annotated[
        Path | None, typer.Option("-w", "--write", help="write .pcapng (a comment per frame) or .pcap (tcpdump -r)")
    ] = None,
    count: Annotated[int | None, typer.Option("-c", "--count", min=1, help="stop after this many frames")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="stop after this many seconds")] = None,
    buffer_kib: Annotated[
        int, typer.Option("-B", "--buffer-size", min=4, help="kernel ring size in KiB (like tcpdump -B)")
    ] = 32768,
    show: Annotated[bool, typer.Option("--print", help="print frames even with -w")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Capture inside a node: one line per frame (time, interface, in/out, summary) or JSON lines.

    Stops at -c, --timeout, Ctrl-C or SIGTERM; then writes the pcap (-w) and
    reports the kernel's PACKET_STATISTICS.  Frames the ring had no room for
    make the capture incomplete: that is a red warning, "lost": true in
    JSON, and exit code 1.
    """
    from labctl.kernel.packet import Capture, CaptureError
    from labctl.lab.live import TargetError, check_capture_filter

    ring = ring_bytes(buffer_kib)
    live = _open(lab)
    where = live.target(target)
    check_capture_filter(bpf)
    if write is not None:
        try:
            write.open("wb").close()  # fail now, not after a long capture
        except OSError as exc:
            raise TargetError(f"cannot write {write}: {exc.strerror}") from None
    printing = write is None or show
    if printing:
        # Ether() only decodes the layers whose modules were imported; load them all
        # now, before the socket opens, rather than on the first frame.
        import scapy.layers.all  # noqa: F401
    shown = 0

    def emit(frames: list[Frame]) -> None:
        nonlocal shown
        for frame in frames[shown:]:
            shown += 1
            if printing:
                _frame_line(frame, as_json)

    with _stopping() as stop:
        try:
            cap = Capture(
                where.namespace,
                where.ifname,
                bpf_filter=bpf,
                count=count,
                timeout=timeout,
                ring_bytes=ring,
                block_bytes=min(ring, 256 << 10),
            )
        except CaptureError as exc:
            from labctl.errors import KernelError

            raise KernelError(str(exc)) from None
        with cap:
            scope = where.label if where.ifname else f"{where.node} (all interfaces)"
            _say(f"capturing on {escape(scope)}{f', filter {escape(bpf)!r}' if bpf else ''}; Ctrl-C to stop", err=True)
            reason = "signal"
            while True:
                ended = cap.wait(POLL)
                emit(cap.frames)
                if ended:
                    reason = "count" if count is not None and shown >= count else "timeout"
                    break
                if stop.is_set():
                    reason = stop.reason or "signal"
                    break
            emit(cap.stop())
    stats = cap.stats()
    written = cap.write_pcap(write, node=where.node) if write is not None else None  # .pcapng: comments, IDBs
    report = {
        "type": "stats",
        "frames": stats.frames,
        "packets": stats.packets,
        "drops": stats.drops,
        "freeze_queue": stats.freeze_queue,
        "lost": stats.lost,
        "file": str(write) if write is not None else None,
        "stopped_by": reason,
    }
    if as_json:
        _json_line(report)
    else:
        to_file = f", {written} written to {escape(str(write))}" if write is not None else ""
        _say(
            f"{stats.frames} frames captured on {escape(scope)}{to_file}; kernel: {stats.packets} passed the filter,"
            f" {stats.drops} dropped; stopped by {reason}",
            err=True,
        )
    if stats.lost:
        _say(
            f"[bold red]warning:[/] the kernel dropped {stats.drops} frames the capture ring had no room for:"
            " this capture is incomplete (raise -B, narrow -f, or print less)",
            err=True,
        )
        raise typer.Exit(1)


def _frame_line(frame: Frame, as_json: bool) -> None:
    """tcpdump's line, with the interface and the direction the kernel reported."""
    try:
        summary = frame.scapy().summary()
    except Exception as exc:  # a truncated or odd frame must not end the capture
        summary = f"undecodable frame ({exc})"
    if as_json:
        _json_line(
            {
                "type": "frame",
                "time": frame.timestamp,
                "iface": frame.ifname,
                "direction": frame.direction,
                "pkttype": frame.pkttype,
                "length": frame.wire_len,
                "captured": len(frame.data),
                "summary": summary,
            }
        )
        return
    when = datetime.datetime.fromtimestamp(frame.timestamp).strftime("%H:%M:%S.%f")
    _line(f"{when} {frame.ifname} {frame.direction:3} {summary}")


# ---------------------------------------------------------------- registration


def register(app: typer.Typer) -> None:
    """Add the traffic commands to ``app`` (labctl's, or a test's own)."""
    for func in (inject, send, listen, capture):
        app.command(name=func.__name__)(reports_errors(func))
