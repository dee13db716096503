"""What a lab looks like on the kernel right now (not what the file asked for).

One shape for every caller: a lab is a dict of its nodes, each node its
interfaces (with the ``peer`` at the other end of the cable), bridges and
routes.  Reading a node costs one namespace switch, one netlink socket and
four dumps, so a thousand-node lab is read in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
from typing import Any

from labctl.kernel import netns
from labctl.kernel.links import PEER_ALIAS, NodeLinks
from labctl.kernel.netlink import Netlink
from labctl.lab import relay, state
from labctl.names import lab_name_problem


def running_labs() -> list[str]:
    """Labs with state or with namespaces left (a crashed lab still shows up)."""
    names = set(state.known_labs())
    for ns in netns.list_labctl():
        parts = netns.split_namespace_name(ns)
        if parts and lab_name_problem(parts[0]) is None:
            names.add(parts[0])
    return sorted(names)


def lab_status(lab: str, nodes: list[str] | None = None) -> dict[str, Any]:
    """The lab as the kernel has it; ``nodes`` limits it to those nodes (same shape, fewer entries)."""
    from labctl.errors import LabNotUpError  # the one "not up" error (exit 2)

    namespaces = netns.list_labctl(lab)
    saved = state.load(lab)
    if not namespaces and saved is None:
        raise LabNotUpError(f"lab {lab} is not up (labs up: {', '.join(running_labs()) or 'none'})")
    if nodes is not None:
        wanted = {netns.namespace_name(lab, node) for node in nodes}
        unknown = sorted(set(nodes) - {netns.split_namespace_name(ns)[1] for ns in namespaces})  # type: ignore[index]
        if unknown:
            raise LabNotUpError(f"lab {lab} has no node {', '.join(unknown)} up")
        namespaces = [ns for ns in namespaces if ns in wanted]
    relays = relay.find(lab)
    made = saved.interfaces if saved else {}
    result = read_nodes(namespaces, {netns.namespace_name(lab, node): len(names) for node, names in made.items()})
    _name_peers(result)
    expected = set(saved.nodes) if saved else set(result)
    if nodes is not None:
        expected &= set(nodes)
    gone = _missing_interfaces(made, result)
    whole = expected <= set(result) and not (gone and saved is not None and saved.status == "up")
    return {
        "lab": lab,
        "file": saved.file if saved else None,
        "state": (saved.status if saved else "orphaned") if whole else "incomplete",
        "missing_nodes": sorted(expected - set(result)),
        "missing_interfaces": gone,
        "nodes": result,
        "relays": {vm: {"pid": pid, "alive": pid in relays} for vm, pid in (saved.relays if saved else {}).items()},
    }


def _missing_interfaces(made: dict[str, list[str]], nodes: dict[str, dict[str, Any]]) -> list[str]:
    """``node:interface`` of each interface ``up`` made that the kernel no longer has (in the nodes read).

    The state says what was made; only the kernel says what is there, so an
    interface deleted by hand shows up here and never as present.
    """
    gone = []
    for node, info in nodes.items():
        present = {iface["name"] for iface in info["interfaces"]}
        gone += [f"{node}:{name}" for name in made.get(node, ()) if name not in present]
    return gone


PARALLEL_ABOVE = 200
"""Labs with more nodes than this are read by one process per core: the kernel's answers and their
decoding are per namespace, so two cores read a 1000-node lab in about half the time."""
BATCHES = 250
"""A big lab's namespaces are handed out in at most this many batches (one byte each in the queue)."""


def read_nodes(namespaces: list[str], weights: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Node -> what the kernel has in its namespace (peers not named yet), in ``namespaces``' order.

    Past :data:`PARALLEL_ABOVE` namespaces this process and forked readers,
    one per further core, take batches of namespaces from one queue (a pipe
    holding a byte per batch) until it is empty: nodes differ a thousandfold
    in cost (a star's switch holds a third of its interfaces), so a fixed
    split would leave one reader waiting for the other.  ``weights`` (a
    namespace's interface count, from the state) put the heaviest first, so
    no reader starts the switch when the others are done.  A reader that
    fails leaves its batches to this process: the result is the same either way.
    """
    import threading

    from labctl.kernel import counters, nft  # noqa: F401 -- imported once here, not again in each forked reader

    workers = min(len(os.sched_getaffinity(0)), 1 + len(namespaces) // PARALLEL_ABOVE)
    if workers < 2 or threading.active_count() > 1:  # fork only a single-threaded process
        return _read_share(namespaces)
    size = -(-len(namespaces) // BATCHES)
    heaviest_first = sorted(namespaces, key=lambda ns: -(weights or {}).get(ns, 0))
    batches = [heaviest_first[i : i + size] for i in range(0, len(namespaces), size)]
    queue, filling = os.pipe()
    try:
        os.write(filling, bytes(range(len(batches))))  # at most 250 bytes: a pipe holds them at once
        os.close(filling)  # before forking: an empty queue then reads as end of file in every reader
        readers = [_fork_reader(batches, queue) for _ in range(workers - 1)]
        found = _read_batches(batches, queue)
    finally:
        os.close(queue)
    try:
        failed = False
        for pid, pipe in readers:
            share = _collect(pid, pipe)
            failed = failed or share is None
            found.update(share or {})
    finally:
        for pid, pipe in readers:  # an interrupted collection: no reader outlives the command
            with contextlib.suppress(OSError):
                os.close(pipe)
            with contextlib.suppress(ChildProcessError, OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    order = [netns.split_namespace_name(ns)[1] for ns in namespaces]  # type: ignore[index]
    if failed:  # what a failed reader took is read here
        found.update(_read_share([ns for ns, node in zip(namespaces, order, strict=True) if node not in found]))
    return {node: found[node] for node in order if node in found}


def _read_batches(batches: list[list[str]], queue: int) -> dict[str, dict[str, Any]]:
    """Take batches from the queue until it is empty (a one-byte read is atomic between readers)."""
    found: dict[str, dict[str, Any]] = {}
    while taken := os.read(queue, 1):
        found.update(_read_share(batches[taken[0]]))
    return found


def _fork_reader(batches: list[list[str]], queue: int) -> tuple[int, int]:
    """A child that reads batches from ``queue`` and writes them, marshalled, into a pipe: (pid, read end)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as out:
                out.write(marshal.dumps(_read_batches(batches, queue)))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def _collect(pid: int, pipe: int) -> dict[str, dict[str, Any]] | None:
    """A reader's nodes, or None when it failed (then the caller reads what it took itself)."""
    chunks = []
    while chunk := os.read(pipe, 1 << 20):
        chunks.append(chunk)
    _, code = os.waitpid(pid, 0)
    if code != 0 or not chunks:
        return None
    loaded = marshal.loads(b"".join(chunks))
    return loaded if isinstance(loaded, dict) else None


def _read_share(namespaces: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    with netns.walking(namespaces) as entering:
        for ns in entering:  # the thread is inside ns: its sockets are opened without another switch
            with NodeLinks(ns, Netlink(dumps_only=True)) as handle:
                found[netns.split_namespace_name(ns)[1]] = _read_node(handle)  # type: ignore[index]
    return found


def _read_node(handle: NodeLinks) -> dict[str, Any]:
    """One node as status shows it: plain data (it crosses a pipe from a forked reader)."""
    links = handle.links()
    routes = handle.routes()
    fdb: list[dict[str, Any]] = []
    if any(info.kind == "bridge" for info in links.values()):
        fdb = handle.static_fdb()
        if any(info.kind == "bridge" and info.details.get("vlan_filtering") for info in links.values()):
            for port, vlans in handle.port_vlans().items():
                if port in links:
                    links[port].port["vlans"] = vlans
    tc, tables = _traffic_control(handle)
    return {
        "namespace": handle.namespace,
        # vars, not dataclasses.asdict: its deep copies cost 1.3 s at 1000 nodes; "peer" is named by _name_peers
        "interfaces": [{**vars(info), "peer": None, "tc": tc.get(info.index)} for info in links.values()],
        "nftables": tables,
        "bridges": {
            name: sorted(i.name for i in links.values() if i.master == name)
            for name, info in links.items()
            if info.kind == "bridge"
        },
        # a bridge's options and its ports' flags are in each interface's "details" and "port"
        "fdb": fdb,
        "routes": routes,
    }


def _traffic_control(handle: NodeLinks) -> tuple[dict[int, Any], list[str]]:
    """The node's tc per ifindex and its nf_tables tables ("inet filter"): two dumps, called inside the namespace."""
    from labctl.kernel import nft
    from labctl.kernel.counters import DEFAULT_QDISCS, qdisc_kinds

    tables = [f"{family} {name}" for family, name in nft.tables_here()]  # the caller is inside the namespace
    if all(kind in DEFAULT_QDISCS for _, kind in qdisc_kinds(handle)):  # what status_here leaves out
        return {}, tables  # nothing set: no pyroute2 socket (1 ms a node, a second at 1000 nodes)
    from labctl.lab import tc

    return tc.status_here(handle.ipr), tables


def _name_peers(nodes: dict[str, dict[str, Any]]) -> None:
    """Set each interface's ``peer``: ``node:interface`` at the other end of its link, or None.

    The name comes from the ifalias ``up`` wrote; the kernel confirms it
    where it can: a veth's IFLA_LINK must be the index of that far end, and
    the far end's must be ours.  A far node outside ``nodes`` (status of
    some nodes) is taken from the alias alone.
    """
    by_name = {(node, iface["name"]): iface for node, info in nodes.items() for iface in info["interfaces"]}
    for info in nodes.values():
        for iface in info["interfaces"]:
            alias = iface["alias"]
            if not alias or not alias.startswith(PEER_ALIAS):
                continue
            peer = alias[len(PEER_ALIAS) :]
            node, _, ifname = peer.partition(":")
            if node not in nodes:
                iface["peer"] = peer
                continue
            far = by_name.get((node, ifname))
            if far is None:
                continue
            link_index = iface["link_index"]
            if link_index is not None and (far["index"] != link_index or far["link_index"] != iface["index"]):
                continue
            iface["peer"] = peer
