"""``labctl trace``: where did my packet go in the kernel, and why was it dropped?

Two forms::

    labctl trace LAB NODE[:IFACE] "IP(dst='10.0.0.2')/UDP(dport=5999)" [--count N] [--json]
    labctl trace LAB --follow [--json]
    labctl trace LAB NODE PACKET -o path.svg        # the path drawn over the topology

The first injects the frame and prints each skb's path in the notes' words
(see :mod:`labctl.lab.trace` for how events are attributed and placed); the
second shows every lab skb as it completes until Ctrl-C or SIGTERM, then the
counter deltas of the whole run.  Styles say how a stage is known: bold is
traced (a tracepoint of this skb), plain is counted (a counter of that node
moved), dim is inferred (the code path between two known stages); a ``?``
marks an event that could not be placed in a node.

SIGTERM is turned into KeyboardInterrupt for the command's duration, so a
killed trace unwinds through the ``with`` blocks and its tracefs instance is
removed, as on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from labctl.cli.common import console, err_console, escape, print_json, reports_errors, require_root, up_lab_name

if TYPE_CHECKING:
    from labctl.lab.live import LiveLab
    from labctl.lab.trace import Ending, FollowSummary, PacketPath, RuleDelta, Segment, Stage, TraceResult

STYLES = {"traced": "bold", "counted": "", "inferred": "dim"}
LEGEND = "[bold]bold[/]: traced · counted · [dim]dim: inferred[/] · [yellow]?[/]: not placed in a node"
HIDDEN_TX = frozenset({"driver xmit", "tx done"})
"""Transmit stages folded into the ``─tx→`` arrow (shown when they say something: rc, qdisc)."""
QUIET_COUNTERS = ("_bytes", "Octets", "NoECTPkts", "OutTransmits", "OutRequests")
"""Counter names left out of the human view (they move with every packet; --json has them)."""
DETAILED = frozenset({"backlog", "AF_PACKET tap", "socket", "napi_gro_receive", "tx done", "bridge"})
"""Stages whose detail is worth its room on the line (which CPU, how many taps, which port)."""
RX_STAGES = frozenset({"netif_rx", "netif_receive_skb", "napi_gro_receive"})
HOOK_NAMES = frozenset({"PREROUTING", "LOCAL_IN", "FORWARD", "POSTROUTING", "LOCAL_OUT"})
MAX_GROUPS = 12
MAX_RELATED = 8


# ---------------------------------------------------------------- signals


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while the body runs.

    The trace's tracefs instance is removed by a ``with`` block; an exception
    is the only thing that unwinds it from wherever the signal lands (a
    default SIGTERM would kill the process and leave the instance behind).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ---------------------------------------------------------------- words


def _say(text: str, *, err: bool = False) -> None:
    (err_console if err else console).print(text, soft_wrap=True, highlight=False)


def counter_words(key: str, value: int) -> str:
    """``Udp.NoPorts`` → ``Udp NoPorts +1``; ``softnet.cpu1.dropped`` → ``softnet cpu1 dropped +5``."""
    if key.count(":") == 2:  # a rule key
        table, chain, number = key.split(":")
        where = "policy" if number == "policy" else f"#{number}"
        return f"{table} {chain} {where} {value:+d}"
    return f"{key.replace('.', ' ')} {value:+d}"


def _ending_counters(ending: Ending) -> str:
    words = []
    for key, value in ending.counters.items():
        if key == "Icmp.OutDestUnreachs" and ending.reason == "NO_SOCKET":
            words.append("ICMP port unreachable sent")
        else:
            words.append(counter_words(key, value))
    return ", ".join(words)


def stage_text(stage: Stage, arrived_on: str | None = None, *, counters: bool = True) -> str:
    """One stage as Rich markup, styled by its evidence, with its counter deltas beside it.

    The device is named when it is not the one the segment arrived on (the
    bridge device after its port).
    """
    name = stage.name
    detail = stage.detail
    if stage.node is None:
        return f"[yellow]?{escape(stage.device or '')} {escape(name)}[/]"
    if name in RX_STAGES and stage.device and arrived_on and stage.device != arrived_on:
        name = f"{name} {stage.device}"
    hook = name in HOOK_NAMES
    if name == "routing":
        text = f"routing: {detail}"
    elif name == "dev_queue_xmit":
        text = f"out {stage.device}"
    elif detail and (name in DETAILED or (hook and stage.evidence == "counted")):
        text = f"{name} ({detail})"
    else:
        text = name
    style = STYLES[stage.evidence]
    markup = f"[{style}]{escape(text)}[/]" if style else escape(text)
    shown = {} if hook or not counters else {k: v for k, v in stage.counters.items() if not k.endswith(QUIET_COUNTERS)}
    if shown:  # a hook's detail already names its rules and their deltas
        markup += f" [dim cyan]⟨{escape(', '.join(counter_words(k, v) for k, v in shown.items()))}⟩[/]"
    return markup


def ending_text(ending: Ending) -> str:
    extra = _ending_counters(ending)
    tail = f"   [dim]({escape(extra)})[/]" if extra else ""
    if ending.fate == "dropped":
        where = ending.function or "?"
        stage = f" [dim]in {escape(ending.node or '?')} {escape(ending.stage or '')}[/]" if ending.stage else ""
        return f"[red]✗ dropped: {escape(ending.reason or '?')} at {escape(where)}[/]{stage}{tail}"
    colour = {"delivered": "green", "consumed": "green", "queued": "yellow"}.get(ending.fate, "cyan")
    mark = {"delivered": "✓", "consumed": "✓", "queued": "■"}.get(ending.fate, "…")
    detail = ending.detail or ending.function or ""
    where = f" in {ending.node}" if ending.node else ""
    return f"[{colour}]{mark} {ending.fate}{escape(where)}: {escape(detail)}[/]{tail}"


def _visible(segment: Segment, first: bool) -> list[Stage]:
    stages = []
    for stage in segment.stages:
        if stage.name in HIDDEN_TX and not (stage.name == "tx done" and stage.detail):
            continue
        if first and stage.name == "dev_queue_xmit" and stage.node is not None:
            continue  # the origin's transmit is the arrow of the next line
        stages.append(stage)
    return stages


def path_lines(path: PacketPath, width: int = 110) -> list[str]:
    """The path as lines of Rich markup: one line per hop, wrapped with a leading ``→``."""
    lines: list[str] = []
    for position, segment in enumerate(path.segments):
        stages = _visible(segment, first=position == 0)
        if segment.hop_from is not None:
            head = f"{segment.hop_from[0]} {segment.hop_from[1]} ─tx→ {segment.node} {segment.device}: "
        elif segment.node is None:
            head = "[yellow]? (not placed)[/]: "
        elif position == 0:
            if not stages:
                continue
            head = f"{segment.node} {stages[0].device or ''}: "
        else:
            head = f"{segment.node}: "
        parts = [stage_text(s, segment.device) for s in stages]
        lines.extend(_wrap(escape(head) if "[" not in head else head, parts, width))
    lines.append("  " + ending_text(path.ending))
    return lines


def _plain_len(markup: str) -> int:
    from rich.text import Text

    return len(Text.from_markup(markup).plain)


def _wrap(head: str, parts: list[str], width: int) -> list[str]:
    lines = []
    current = head
    length = _plain_len(head)
    for index, part in enumerate(parts):
        sep = "" if index == 0 else " → "
        size = _plain_len(part)
        if index and length + len(sep) + size > width:
            lines.append(current)
            current, length = "  → " + part, 4 + size
            continue
        current += sep + part
        length += len(sep) + size
    lines.append(current)
    return lines


def _alike(paths: list[PacketPath]) -> list[list[PacketPath]]:
    """Paths that read the same (kind, stages, ending), in order of first appearance."""
    groups: dict[tuple[object, ...], list[PacketPath]] = {}
    for path in paths:
        groups.setdefault((path.kind, path.signature()), []).append(path)
    return list(groups.values())


def _counter_block(counters: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for node, values in sorted(counters.items()):
        shown = [counter_words(k, v) for k, v in values.items() if not k.endswith(QUIET_COUNTERS)]
        if shown:
            lines.append(f"  {escape(node)}: {escape(', '.join(shown))}")
    return lines


def _rules_block(rules: dict[str, dict[str, RuleDelta]]) -> list[str]:
    from labctl.lab.trace import rule_words

    return [
        f"  {escape(node)}: {escape(rule_words(rule))}"
        for node, rows in sorted(rules.items())
        for rule in rows.values()
    ]


def _softnet_line(softnet: dict[str, dict[str, int]]) -> str | None:
    parts = [
        f"cpu{cpu} {column} {value:+d}"
        for cpu, columns in sorted(softnet.items())
        for column, value in columns.items()
        if isinstance(value, int)
    ]
    return f"  softnet (host-wide): {', '.join(parts)}" if parts else None


def print_result(result: TraceResult) -> None:
    """People's view of a traced injection."""
    width = max(60, min(console.width, 140) - 2)
    sent = f"{result.sent}/{result.count}" if result.sent != result.count else str(result.count)
    _say(
        f"[bold]trace {escape(result.lab)}[/]: {sent} × {escape(result.summary)} ({result.frame_bytes} bytes)"
        f" from {escape(result.node)}:{escape(result.interface)} in {result.elapsed_seconds:.2f} s"
    )
    _say(f"[dim]{LEGEND}[/]")
    if result.lost_events:
        _say(f"[yellow]warning: the kernel lost {result.lost_events} trace events: the paths may be incomplete[/]")
    if len(result.packets) < result.sent:
        missing = result.sent - len(result.packets)
        _say(f"[yellow]warning: {missing} injected skbs were not seen in the trace[/]")
    if not result.settled:
        _say("[yellow]warning: the kernel was still busy with them when the trace ended[/]")
    groups = result.groups()
    for group in groups[:MAX_GROUPS]:
        first = group[0]
        title = f"packet {first.index + 1}"
        if len(group) > 1:
            title += f" ×{len(group)} identical"
        _say(f"\n[bold cyan]{title}[/] [dim]skb {hex(first.skb)}[/]")
        for line in path_lines(first, width):
            _say(line)
    if len(groups) > MAX_GROUPS:
        rest = sum(len(g) for g in groups[MAX_GROUPS:])
        _say(f"\n[dim]… {len(groups) - MAX_GROUPS} more kinds of path ({rest} packets); --json has them all[/]")
    if result.related:
        _say("\n[bold]related skbs[/] [dim](born while our thread handled the packet)[/]")
        kinds = _alike(result.related)
        for group in kinds[:MAX_RELATED]:
            path = group[0]
            lines = path_lines(path, width)
            many = f" [bold cyan]×{len(group)} identical[/]" if len(group) > 1 else ""
            _say(f"  [dim]{escape(path.kind)}[/]{many} " + lines[0])
            for line in lines[1:]:
                _say("  " + line)
        if len(kinds) > MAX_RELATED:
            rest = sum(len(g) for g in kinds[MAX_RELATED:])
            _say(f"  [dim]… {len(kinds) - MAX_RELATED} more kinds ({rest} skbs)[/]")
    _print_counters(result.counters, result.softnet, result.rules)


def _print_counters(
    counters: dict[str, dict[str, int]], softnet: dict[str, dict[str, int]], rules: dict[str, dict[str, RuleDelta]]
) -> None:
    block = _counter_block(counters)
    softnet_line = _softnet_line(softnet)
    if block or softnet_line:
        _say("\n[bold]counters[/] [dim](Δ over the trace, all packets)[/]")
        for line in block:
            _say(line)
        if softnet_line:
            _say(softnet_line)
    rule_lines = _rules_block(rules)
    if rule_lines:
        _say("[bold]rules[/] [dim](iptables packet counters, Δ)[/]")
        for line in rule_lines:
            _say(line)


def print_follow_path(path: PacketPath) -> None:
    width = max(60, min(console.width, 140) - 2)
    length = f", {path.length} bytes" if path.length else ""
    _say(f"[bold cyan]#{path.index}[/] [dim]{path.start:.6f} {escape(path.kind)}{length} skb {hex(path.skb)}[/]")
    for line in path_lines(path, width):
        _say(line)


def print_follow_summary(summary: FollowSummary) -> None:
    _say(f"\n[bold]followed {summary.seconds:.1f} s[/]: {summary.shown} skbs shown", err=True)
    if summary.ambiguous:
        _say(
            f"[dim]{summary.ambiguous} skbs on device names other namespaces share, started by no lab task,"
            " were left out[/]",
            err=True,
        )
    if summary.lost_events:
        _say(f"[yellow]warning: the kernel lost {summary.lost_events} trace events[/]", err=True)
    _print_counters(summary.counters, summary.softnet, summary.rules)


# ---------------------------------------------------------------- the command


def _open(lab: str) -> LiveLab:
    require_root()
    name = up_lab_name(lab)  # before live's imports (Scapy): a typo is answered at once

    from labctl.lab.live import open_lab

    live = open_lab(name, file=lab if name != lab else None)
    for warning in live.warnings:
        _say(f"[yellow]warning:[/] {escape(warning)}", err=True)
    return live


def _json_line(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def trace(
    lab: Annotated[
        str, typer.Argument(metavar="LAB", help="lab name, or the lab file that defines it", show_default=False)
    ],
    target: Annotated[
        str | None, typer.Argument(metavar="NODE[:IFACE]", help="node, and the interface to inject on")
    ] = None,
    expr: Annotated[
        str | None, typer.Argument(metavar="PACKET", help="Scapy expression, e.g. \"IP(dst='10.0.0.2')/UDP()\"")
    ] = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="how many frames to inject")] = 1,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="show every lab skb live, until Ctrl-C")] = False,
    cpu: Annotated[int | None, typer.Option("--cpu", min=0, help="inject from this CPU (RPS experiments)")] = None,
    settle: Annotated[float, typer.Option("--settle", min=0.0, help="max seconds to wait for the kernel")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="JSON (JSON lines with --follow)")] = False,
    output: Annotated[
        str | None,
        typer.Option("-o", "--output", help="draw each kind of path over the topology: path.svg|.png|.pdf|.dot"),
    ] = None,
) -> None:
    """Inject a packet and show where it went in the kernel, and why it stopped there.

    Each stage is in the notes' words: bold stages were traced on this skb, plain
    ones counted by a counter of that node, dim ones inferred.  With --follow,
    show every skb of the lab as it completes (any traffic), until Ctrl-C.
    """
    if follow:
        if target is not None or expr is not None:
            raise typer.BadParameter("--follow traces the lab's own traffic; give only LAB", param_hint="--follow")
        if output is not None:
            raise typer.BadParameter("pictures are drawn of an injected packet, not with --follow", param_hint="-o")
        _follow(lab, as_json)
        return
    if target is None or expr is None:
        raise typer.BadParameter("give NODE[:IFACE] and PACKET (or --follow)", param_hint="NODE[:IFACE] PACKET")
    if output is not None:
        from labctl.topology.graph import picture_type

        if picture_type(output) not in ("svg", "png", "pdf", "dot", "gv"):
            raise typer.BadParameter(f"{output}: use .svg, .png, .pdf or .dot", param_hint="-o")
    live = _open(lab)
    from labctl.lab.live import prepare
    from labctl.lab.trace import trace_frame

    where = live.target(target)
    frame = prepare(where, expr)
    if cpu is not None and cpu not in _cpus():
        raise typer.BadParameter(f"this machine has CPUs {sorted(_cpus())}", param_hint="--cpu")
    with sigterm_interrupts():
        result = trace_frame(live.topo, where.node, frame, expr, count=count, cpu=cpu, settle=settle)
    if as_json:
        print_json(result.as_dict())
    else:
        print_result(result)
    if output is not None:
        _draw(live, result, output, quiet=as_json)


def _draw(live: LiveLab, result: TraceResult, output: str, *, quiet: bool) -> None:
    """One picture per kind of path (packets that took the same path share one), as the text groups them."""
    from labctl.lab.trace.picture import write_pictures

    groups = result.groups()
    if not groups:
        _say("[yellow]no packet was traced: no picture written[/]", err=True)
        return
    titles = [
        f"{result.lab}: packet {g[0].index + 1}"
        + (f" (and {len(g) - 1} like it)" if len(g) > 1 else "")
        + f" — {result.summary} from {result.node}:{result.interface}"
        for g in groups
    ]
    written = write_pictures(live.topo, [g[0] for g in groups], output, titles)
    for name in written:
        _say(f"wrote {escape(name)}", err=quiet)


def _cpus() -> set[int]:
    import os

    return set(os.sched_getaffinity(0))


def _follow(lab: str, as_json: bool) -> None:
    from labctl.lab.trace import Follower

    live = _open(lab)
    follower = Follower(live.topo)
    with sigterm_interrupts():
        try:
            with follower:
                if not as_json:
                    _say(f"following lab {escape(live.name)}; Ctrl-C to stop", err=True)
                    _say(f"[dim]{LEGEND}[/]", err=True)
                for path in follower.paths():
                    if as_json:
                        _json_line({"type": "packet", **path.as_dict()})
                    else:
                        print_follow_path(path)
        except KeyboardInterrupt:
            pass  # the normal end of --follow; the instance is already gone
    summary = follower.summary()
    if as_json:
        _json_line(summary.as_dict())
    else:
        print_follow_summary(summary)


def register(app: typer.Typer) -> None:
    """Add ``trace`` to ``app`` (labctl's, or a test's own)."""
    app.command(name="trace")(reports_errors(trace))
