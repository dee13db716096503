"""Rich renderings of results for people (programs use --json)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.tree import Tree

from labctl.cli.common import console


def status(data: dict[str, Any]) -> None:
    colour = {"up": "green", "building": "yellow"}.get(data["state"], "red")
    head = f"[bold]{data['lab']}[/] [{colour}]{data['state']}[/]"
    if data.get("file"):
        head += f"  ({data['file']})"
    console.print(head)
    if data["missing_nodes"]:
        console.print(f"  [red]missing nodes:[/] {', '.join(data['missing_nodes'])}")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("node", "interface", "kind", "state", "mac", "mtu", "master", "addresses"):
        table.add_column(column, overflow="fold")
    for node, info in sorted(data["nodes"].items()):
        for iface in info["interfaces"]:
            state = "[green]up[/]" if iface["up"] else "[red]down[/]"
            if iface["up"] and not iface["carrier"] and iface["kind"] != "loopback":
                state = "[yellow]no-carrier[/]"
            table.add_row(
                node,
                iface["name"],
                iface["kind"],
                state,
                iface["mac"],
                str(iface["mtu"]),
                iface["master"] or "",
                " ".join(iface["addresses"]),
            )
            node = ""
    console.print(table)
    for node, info in sorted(data["nodes"].items()):
        routes = [r for r in info["routes"] if r["via"] or r["dst"] == "default"]
        for route in routes:
            console.print(f"  {node}: route {route['dst']} via {route['via'] or route['dev']}")
    for vm, relay in data["relays"].items():
        alive = "[green]running[/]" if relay["alive"] else "[red]dead[/]"
        console.print(f"  relay for {vm}: pid {relay['pid']} {alive}")


def cleaned(done: Any) -> None:
    tree = Tree("[bold]labctl clean[/]")
    tree.add(f"relays stopped: {len(done.relays)}")
    tree.add(f"namespaces removed: {len(done.namespaces)} {' '.join(done.namespaces)}")
    restored = ", ".join(f"{k}={v}" for k, v in done.sysctls_restored.items())
    tree.add(f"host sysctls restored: {restored or 'none'}")
    tree.add(f"trace instances removed: {len(done.trace_instances)}")
    tree.add(f"lab states forgotten: {len(done.states)}")
    if done.busy:
        tree.add(f"[yellow]busy (another labctl command holds the lock), left alone:[/] {' '.join(done.busy)}")
    console.print(tree)
