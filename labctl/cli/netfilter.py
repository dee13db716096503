"""``labctl rules`` and ``labctl hooks``: a running lab's netfilter, as the kernel has it.

The commands only parse arguments and print; :mod:`labctl.lab.netfilter`
reads the namespaces.  ``register(app)`` adds them to labctl's Typer app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from labctl.cli.common import console, print_json, reports_errors, require_root, up_lab_name

if TYPE_CHECKING:
    from labctl.kernel.nftrace import HookStep

LabArg = Annotated[str, typer.Argument(help="lab name, or the lab file that defines it")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


@reports_errors
def rules(
    lab: LabArg,
    node: Annotated[str | None, typer.Argument(help="only this node (all nodes when omitted)")] = None,
    json: JsonOpt = False,
) -> None:
    """Every iptables, ip6tables, ebtables and nft rule of the lab's nodes, with packet/byte counters.

    iptables and ip6tables rules are read with python-iptables, which uses the legacy xtables
    backend: inside a node look with `labctl exec LAB NODE -- iptables-legacy -nvL`
    (`ip6tables-legacy -nvL`; plain `iptables` is the nft variant and only warns that legacy tables exist).
    ebtables rules live in nf_tables (ebtables-nft; this kernel has no legacy
    ebtables): `ebtables-nft -L --Lc` or `nft list ruleset`.  Rule 0 of a chain is
    its policy; ebtables policies keep no counters (shown as –).  nft rules (a
    node's `nftables:`) are numbered by their handle (`nft -a list ruleset`); a rule
    without a `counter` statement has no counts.  Listing never creates a table.
    """
    require_root()
    name = up_lab_name(lab)  # before the heavy import: a typo is answered at once

    from labctl.lab.netfilter import lab_rules

    rows = lab_rules(name, node)
    if json:
        print_json([r.as_dict() for r in rows])
        return
    if not rows:
        console.print(f"lab [bold]{name}[/]: no iptables, ip6tables, ebtables or nft tables in {node or 'any node'}")
        return
    from rich.table import Table

    for current in dict.fromkeys(r.node for r in rows):
        table = Table(title=f"{name} / {current}", title_justify="left", show_edge=False, pad_edge=False)
        for column, justify in (
            ("table", "left"),
            ("chain", "left"),
            ("#", "right"),
            ("rule", "left"),
            ("pkts", "right"),
            ("bytes", "right"),
        ):
            table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for row in (r for r in rows if r.node == current):
            where = f"{row.family} {row.table}" if row.family in ("bridge", "nft", "ip6") else row.table
            number = "policy" if row.number == 0 else str(row.number)
            text = (row.policy or "") if row.number == 0 else row.rule
            style = "dim" if row.number == 0 and not row.packets else None
            table.add_row(where, row.chain, number, text, _count(row.packets), _count(row.bytes), style=style)
        console.print(table)


@reports_errors
def hooks(
    lab: LabArg,
    node: Annotated[str, typer.Argument(help="node that sends the packet")],
    packet: Annotated[str, typer.Argument(help="Scapy expression, e.g. \"IP(dst='10.0.2.1')/UDP(dport=5000)\"")],
    via: Annotated[
        list[str] | None,
        typer.Option("--via", metavar="NODE", help="trace only these nodes (repeat; default: every node)"),
    ] = None,
    interface: Annotated[str | None, typer.Option("--interface", "-i", help="send on this interface")] = None,
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=100, help="packets to send")] = 1,
    conntrack: Annotated[
        bool,
        typer.Option(
            "--conntrack/--no-conntrack",
            help="let the trace switch conntrack on so nat chains run (they run only for tracked packets)",
        ),
    ] = True,
    json: JsonOpt = False,
) -> None:
    """Inject a packet and show, per node, the netfilter tables and chains it passed, in order.

    An NFLOG rule at the top of every chain (iptables raw/mangle/nat/filter, and
    ebtables nat/filter on nodes with a bridge) logs the packet with a sequence
    number for as long as the trace lasts; the order is the kernel's.  An IPv6
    packet is traced through the ip6tables tables instead (steps ip6:filter:INPUT)
    and gets a random flow label (unless fl= is set).  The packet
    gets a random IP ID (unless the expression sets id=), which NAT never changes,
    so the walk follows it through DNAT/SNAT, and a random source port or ICMP
    echo id (unless set), so each trace is a new flow: nat chains run only for a
    flow's first packet.  A DROP/REJECT rule or DROP policy
    whose counter rose is named, and so is the kernel's drop reason.  Tracing
    creates the traced tables in namespaces that had none (legacy xtables tables
    cannot be removed again).
    """
    require_root()
    name = up_lab_name(lab)  # before the heavy import: a typo is answered at once

    from labctl.lab.netfilter import trace_hooks

    walk = trace_hooks(name, node, packet, via=via, interface=interface, count=count, conntrack=conntrack)
    if json:
        print_json(walk.as_dict())
        return
    id_text = f", IP ID {walk.ip_id:#06x}" if walk.ip_id is not None else ""
    id_text += f", flow label {walk.flow:#07x}" if walk.flow is not None else ""
    console.print(
        f"[bold]{walk.lab}[/]: {walk.count} × {walk.packet} from {walk.node}:{walk.interface}{id_text}",
        highlight=False,
    )
    width = max(len(n.node) for n in walk.nodes) if walk.nodes else 0
    for item in walk.nodes:
        label = f"{item.node}:".ljust(width + 1)
        if not item.steps:
            why = "no hook saw it"
            if item.node == walk.node:
                why += ": injected with AF_PACKET, below IP, so no OUTPUT/POSTROUTING"
            console.print(f"  {label} [dim]({why})[/]", highlight=False)
            continue
        first = item.steps[0]
        where = f" [dim]{first.src} → {first.dst}[/]" if first.src else ""
        packets = _per_packet(item.steps)
        for number, steps in enumerate(packets, start=1):
            head = label if number == 1 else " " * len(label)
            mark = f"#{number} " if len(packets) > 1 else ""
            lead = where if number == 1 else ""
            console.print(f"  {head}{lead} {mark}{_walk_text(steps)}", highlight=False)
        for verdict in item.verdicts:
            console.print(
                f"  {' ' * (width + 1)} [red]✗ dropped by {verdict.where}[/] ({verdict.packets}): {verdict.rule}",
                highlight=False,
            )
    if walk.drops:
        text = ", ".join(f"{what} ×{n}" for what, n in sorted(walk.drops.items()))
        console.print(f"  kernel drops: [red]{text}[/]", highlight=False)


def _per_packet(steps: list[HookStep]) -> list[list[HookStep]]:
    """Split a node's steps where the first step comes round again (the next packet)."""
    packets: list[list[HookStep]] = []
    for step in steps:
        if not packets or step.name == steps[0].name:
            packets.append([])
        packets[-1].append(step)
    return packets


def _walk_text(steps: list[HookStep]) -> str:
    """``raw:PREROUTING → …``, noting where the addresses changed (NAT)."""
    from labctl.lab.netfilter import short_name

    parts: list[str] = []
    last: tuple[str | None, str | None] | None = None
    for step in steps:
        text = short_name(step)
        addresses = (step.src, step.dst)
        if step.src is not None and addresses != last:
            if last is not None:
                text += f" [cyan]({step.src} → {step.dst})[/]"
            last = addresses
        parts.append(text)
    return " → ".join(parts)


def register(app: typer.Typer) -> None:
    """Add ``rules`` and ``hooks`` to labctl's app."""
    app.command("rules")(rules)
    app.command("hooks")(hooks)
