"""``labctl inject``: a frame written onto a node's interface with AF_PACKET (the node's stack is skipped)."""

from __future__ import annotations

from typing import Annotated

import typer

from labctl.cli.common import escape, print_json
from labctl.cli.traffic.shared import CountOpt, JsonOpt, LabArg, errno_list, open_lab, say, stopping


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

    live = open_lab(lab)
    node = live.target(target)
    frame = prepare(node, expr)
    with stopping() as stop:
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
        say(f"{sent} ({result.length} bytes) on {where} {pace}".rstrip())
        if result.failed:
            say(f"[yellow]refused {result.failed}:[/] {errno_list(result.error_names())}")
        if result.interrupted:
            say(f"[yellow]stopped by {stop.reason}[/]", err=True)
    if result.interrupted:
        raise typer.Exit(130)
    if result.failed:
        raise typer.Exit(1)
