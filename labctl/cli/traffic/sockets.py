"""``labctl send`` and ``labctl listen``: the node's own UDP sockets, the sending and the receiving application."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated

import typer

from labctl.cli.common import print_json
from labctl.cli.traffic.shared import (
    POLL,
    CountOpt,
    JsonOpt,
    LabArg,
    errno_list,
    json_line,
    kernel_error,
    line,
    open_lab,
    preview,
    say,
    stopping,
)


class Proto(StrEnum):
    """Transport of send/listen; only UDP for now (the notes' socket experiments are UDP)."""

    udp = "udp"



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

    live = open_lab(lab)
    where = live.target(node, allow_iface=False)
    dst, dport = parse_endpoint(destination)
    if src is not None:
        src = parse_address(src)
    data = payload.encode()
    try:
        result = send_udp(where.namespace, dst, dport, data, count=count, sport=sport, src=src)
    except OSError as exc:  # no socket of that family (IPv6 off in the node)
        raise kernel_error(f"cannot send udp to {destination} from {where.node}", exc) from None
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
        say(f"{sent} from {where.node} to {dst}:{dport} ({len(data)} bytes each)")
        if result.failed:
            say(f"[red]failed {result.failed}:[/] {errno_list(errors)}")
    if result.failed:
        raise typer.Exit(1)



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
    live = open_lab(lab)
    where = live.target(node, allow_iface=False)
    addr, port = parse_endpoint(address, listening=True)
    check_socket_filter(socket_filter)
    shown = 0
    with stopping() as stop:
        try:
            listener = UdpListener(
                where.namespace, port, addr, rcvbuf=rcvbuf, read=not no_read, socket_filter=socket_filter
            )
        except OSError as exc:
            raise kernel_error(f"cannot listen on udp {addr}:{port} in {where.node}", exc) from None
        with listener:
            how = "holding the socket unread" if no_read else "listening"
            say(f"{how} on {where.node} {proto.value} {addr}:{port}; Ctrl-C to stop", err=True)
            deadline = None if timeout is None else time.monotonic() + timeout
            reason = "signal"
            while True:
                if not no_read:
                    for payload, (source, sport) in listener.received()[shown : count or None]:
                        shown += 1
                        if as_json:
                            json_line(
                                {
                                    "type": "datagram",
                                    "source": f"{source}:{sport}",
                                    "length": len(payload),
                                    "payload": preview(payload),
                                }
                            )
                        else:
                            line(f"{source}:{sport}  {len(payload)} bytes  {preview(payload)}")
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
        json_line(report)
        return
    drops = f"[yellow]{stats.drops} drops[/]" if stats.drops else "0 drops"
    say(
        f"{where.node} {proto.value} {addr}:{port}: {stats.received} datagrams read, {stats.queued_bytes} bytes"
        f" still queued (rcvbuf {stats.rcvbuf}), {drops}; stopped by {reason}",
        err=True,
    )
