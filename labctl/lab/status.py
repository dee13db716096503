"""What a lab looks like on the kernel right now (not what the file asked for)."""

from __future__ import annotations

import dataclasses
from typing import Any

from labctl.errors import LabStateError
from labctl.kernel import netns
from labctl.kernel.links import NodeLinks
from labctl.lab import relay, state


def running_labs() -> list[str]:
    """Labs with state or with namespaces left (a crashed lab still shows up)."""
    names = set(state.known_labs())
    for ns in netns.list_labctl():
        parts = netns.split_namespace_name(ns)
        if parts:
            names.add(parts[0])
    return sorted(names)


def lab_status(lab: str) -> dict[str, Any]:
    namespaces = netns.list_labctl(lab)
    saved = state.load(lab)
    if not namespaces and saved is None:
        raise LabStateError(f"lab {lab} is not up (labs up: {', '.join(running_labs()) or 'none'})")
    relays = relay.find(lab)
    nodes: dict[str, Any] = {}
    for ns in namespaces:
        node = netns.split_namespace_name(ns)[1]  # type: ignore[index]
        with NodeLinks(ns) as handle:
            links = handle.links()
            routes = handle.routes()
        nodes[node] = {
            "namespace": ns,
            "interfaces": [dataclasses.asdict(info) for info in links.values()],
            "bridges": {
                name: sorted(i.name for i in links.values() if i.master == name)
                for name, info in links.items()
                if info.kind == "bridge"
            },
            "routes": routes,
        }
    expected = set(saved.nodes) if saved else set(nodes)
    return {
        "lab": lab,
        "file": saved.file if saved else None,
        "state": (saved.status if saved else "orphaned") if expected <= set(nodes) else "incomplete",
        "missing_nodes": sorted(expected - set(nodes)),
        "nodes": nodes,
        "relays": {vm: {"pid": pid, "alive": pid in relays} for vm, pid in (saved.relays if saved else {}).items()},
    }
