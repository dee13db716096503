"""``labctl capture``: tcpdump inside a node, with a ring the machine can spare and the kernel's drop count."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from labctl.cli.common import escape
from labctl.cli.traffic.shared import POLL, JsonOpt, LabArg, json_line, line, open_lab, say, stopping

if TYPE_CHECKING:
    from labctl.kernel.frames import Frame

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
    from labctl.kernel.bpf import CaptureError
    from labctl.kernel.capture import Capture
    from labctl.lab.live import TargetError, check_capture_filter

    ring = ring_bytes(buffer_kib)
    live = open_lab(lab)
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

    with stopping() as stop:
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
            say(f"capturing on {escape(scope)}{f', filter {escape(bpf)!r}' if bpf else ''}; Ctrl-C to stop", err=True)
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
        json_line(report)
    else:
        to_file = f", {written} written to {escape(str(write))}" if write is not None else ""
        say(
            f"{stats.frames} frames captured on {escape(scope)}{to_file}; kernel: {stats.packets} passed the filter,"
            f" {stats.drops} dropped; stopped by {reason}",
            err=True,
        )
    if stats.lost:
        say(
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
        json_line(
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
    line(f"{when} {frame.ifname} {frame.direction:3} {summary}")
