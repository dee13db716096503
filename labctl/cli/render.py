"""Rich renderings of results for people (programs use --json).

Rich is imported inside each function: ``labctl --help`` and the JSON paths
never pay for it.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from labctl.cli.common import console, plain, say

SUMMARY_ABOVE = 50
"""Labs with more nodes than this are summarised: a table of thousands of rows helps no one."""


def status(data: dict[str, Any], full: bool = False) -> None:
    """One lab: every interface, or past :data:`SUMMARY_ABOVE` nodes a summary and what is wrong.

    The summary's lines go through :func:`say` (plain text into a pipe): a
    script polling a big lab's status does not pay for importing Rich.
    """
    colour = {"up": "green", "building": "yellow"}.get(data["state"], "red")
    head = f"[bold]{_text(data['lab'])}[/] [{colour}]{data['state']}[/]"
    if data.get("file"):
        head += f"  ({_text(data['file'])})"
    say(head)
    if data["missing_nodes"]:
        say(f"  [red]missing nodes:[/] {_text(', '.join(data['missing_nodes']))}")
    gone = data.get("missing_interfaces", [])
    if gone:
        more = f" and {len(gone) - 20} more (`--json` lists them all)" if len(gone) > 20 else ""
        say(f"  [red]missing interfaces:[/] {_text(', '.join(gone[:20]))}{more}")
    if full or len(data["nodes"]) <= SUMMARY_ABOVE:
        _interfaces_table(data)
        _kind_details(data)
        for node, info in sorted(data["nodes"].items()):
            for route in info["routes"]:
                if route["via"] or route["dst"] == "default":
                    _plain(f"  {node}: route {route['dst']} via {route['via'] or route['dev']}")
            _traffic_lines(node, info)
    else:
        _summary(data)
    for vm, relay in data["relays"].items():
        alive = "[green]running[/]" if relay["alive"] else "[red]dead[/]"
        say(f"  relay for {_text(vm)}: pid {relay['pid']} {alive}")


def _text(value: str) -> str:
    """A name or path as literal text in a :func:`say` line (Rich's escape of ``[``)."""
    return value.replace("[", "\\[")


def _plain(line: str) -> None:
    """A line without markup: Rich on a terminal (no highlighting), as it is into a pipe."""
    plain(line)


PORT_DEFAULTS = {"learning": 1, "flood": 1, "mcast_flood": 1, "bcast_flood": 1, "isolated": 0, "hairpin": 0}
PORT_DEFAULTS["neigh_suppress"] = 0


def _kind_details(data: dict[str, Any]) -> None:
    """Under the table: each virtual interface's settings, bridges' options, port flags that differ, static fdb."""
    for node, info in sorted(data["nodes"].items()):
        for iface in info["interfaces"]:
            details = iface.get("details") or {}
            if details:
                words = " ".join(f"{k} {_word(v)}" for k, v in details.items())
                _plain(f"  {node}: {iface['name']} ({iface['kind']}) {words}")
            port = {k: v for k, v in (iface.get("port") or {}).items() if PORT_DEFAULTS.get(k) != v}
            vlans = port.pop("vlans", {})
            if vlans:
                port["vlans"] = " ".join(
                    f"{vid}({words})" if words != "tagged" else str(vid) for vid, words in vlans.items()
                )
            if port:
                words = ", ".join(f"{k} {_word(v)}" for k, v in port.items())
                _plain(f"  {node}: {iface['master']} port {iface['name']}: {words}")
        for entry in info.get("fdb", []):
            vlan = f" vlan {entry['vlan']}" if entry["vlan"] is not None else ""
            sticky = " sticky" if entry["sticky"] else ""
            _plain(f"  {node}: {entry['bridge']} fdb {entry['mac']} on {entry['port']}{vlan} static{sticky}")


def _word(value: Any) -> str:
    return {0: "off", 1: "on"}.get(value, str(value)) if isinstance(value, int) else str(value)


def _traffic_lines(node: str, info: dict[str, Any]) -> None:
    """A node's nft tables and each interface's tc, one line each (only where there is some)."""
    if info.get("nftables"):
        _plain(f"  {node}: nftables {', '.join(info['nftables'])}")
    for iface in info["interfaces"]:
        tc = iface.get("tc")
        if not tc:
            continue
        text = f"  {node}:{iface['name']}: tc {', '.join(tc['qdiscs'])}"
        if tc["classes"]:
            text += f"; classes {', '.join(tc['classes'])}"
        if tc["filters"]:
            text += f"; filters {', '.join(tc['filters'])}"
        _plain(text)


def _state(iface: dict[str, Any]) -> str:
    if not iface["up"]:
        return "down"
    if not iface["carrier"] and iface["kind"] != "loopback":
        return "no-carrier"
    return "up"


COLUMNS = ("node", "interface", "kind", "state", "peer", "mac", "mtu", "master", "addresses")


def _interfaces_table(data: dict[str, Any]) -> None:
    """Rich's table on a terminal; into a pipe, aligned plain rows that are never folded (grep, awk).

    Rich lays a table out to 80 columns when stdout is no terminal, folding
    every cell, and takes 3 s for the 3000 rows of ``status --all`` of a
    1000-host star; the plain rows take milliseconds.
    """
    rows = []
    for node, info in sorted(data["nodes"].items()):
        for iface in info["interfaces"]:
            rows.append(
                (
                    node,
                    iface["name"],
                    iface["kind"],
                    _state(iface),
                    iface.get("peer") or "",
                    iface["mac"],
                    str(iface["mtu"]),
                    iface["master"] or "",
                    " ".join(iface["addresses"]),
                )
            )
    if not sys.stdout.isatty():
        widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS) - 1)]
        for row in [COLUMNS, *rows]:
            cells = "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
            sys.stdout.write(f"{cells}  {row[-1]}".rstrip() + "\n")
        return
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    colours = {"up": "green", "down": "red", "no-carrier": "yellow"}
    shown = ""
    for row in rows:
        node, state = row[0], row[3]
        table.add_row(node if node != shown else "", *row[1:3], f"[{colours[state]}]{state}[/]", *row[4:])
        shown = node
    console.print(table)


def _summary(data: dict[str, Any]) -> None:
    """Counts, the bridges, and every interface that is not up (those are what a user looks for)."""
    nodes = data["nodes"]
    interfaces = [(node, iface) for node, info in sorted(nodes.items()) for iface in info["interfaces"]]
    states = Counter(_state(iface) for _, iface in interfaces)
    kinds = Counter(iface["kind"] for _, iface in interfaces)
    addresses = sum(len(iface["addresses"]) for _, iface in interfaces)
    routes = sum(1 for info in nodes.values() for r in info["routes"] if r["via"] or r["dst"] == "default")
    say(
        f"  {len(nodes)} nodes, {len(interfaces)} interfaces"
        f" ({', '.join(f'{n} {_text(k)}' for k, n in sorted(kinds.items()))}),"
        f" {addresses} addresses, {routes} gateway routes"
    )
    say(
        f"  interfaces: [green]{states['up']} up[/], [red]{states['down']} down[/],"
        f" [yellow]{states['no-carrier']} no-carrier[/]"
    )
    for node, info in sorted(nodes.items()):
        for bridge, ports in sorted(info["bridges"].items()):
            say(f"  bridge {_text(node)}:{_text(bridge)}: {len(ports)} ports")
    trouble = [(node, iface) for node, iface in interfaces if _state(iface) != "up"]
    for node, iface in trouble[:20]:
        peer = iface.get("peer") or "-"
        say(f"  [red]{_state(iface)}:[/] {_text(node)}:{_text(iface['name'])} (peer {_text(peer)})")
    if len(trouble) > 20:
        say(f"  ... and {len(trouble) - 20} more not up (`--json` lists them all)")
    lab = _text(data["lab"])
    say(
        f"  [dim]summarised ({len(nodes)} nodes > {SUMMARY_ABOVE}): `labctl status {lab} --all` for every"
        f" interface, `--node NODE` for some nodes, `--json` for everything[/]"
    )


def cleaned(done: Any) -> None:
    from rich.tree import Tree

    tree = Tree("[bold]labctl clean[/]")
    tree.add(f"relays stopped: {len(done.relays)}")
    tree.add(f"namespaces removed: {len(done.namespaces)} {' '.join(done.namespaces)}")
    restored = ", ".join(f"{k}={v}" for k, v in done.sysctls_restored.items())
    tree.add(f"host sysctls restored: {restored or 'none'}")
    tree.add(f"trace instances removed: {len(done.trace_instances)}")
    if done.trace_rules:
        tree.add(f"hook-trace rules of killed tracers removed: {' '.join(done.trace_rules)}")
    tree.add(f"lab states forgotten: {len(done.states)}")
    if done.busy:
        tree.add(f"[yellow]busy (another labctl command holds the lock), left alone:[/] {' '.join(done.busy)}")
    console.print(tree)
