"""Kernel counter snapshots, per lab namespace, and their deltas.

Tracepoints say *which* packet went where; counters say *how many*, and they
are what the notes' readers know (``netstat -s``, ``ip -s link``, ``tc -s``).
A lab proves a claim with the delta of a counter across an experiment, so a
snapshot is taken before and after and only what changed is reported.

The protocol counters are per network namespace and must be read from the
calling *thread's* namespace: :func:`labctl.kernel.netns.entered` moves only
the thread, and ``/proc/self/net`` follows the process's main thread, so
reads go through ``/proc/thread-self/net``.  softnet_stat is per CPU and
global to the host.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from labctl.kernel import netns
from labctl.kernel.links import NodeLinks
from labctl.kernel.netlink import RTM_GETQDISC, Netlink, attributes

SNMP_FILES = ("/proc/thread-self/net/snmp", "/proc/thread-self/net/netstat")
SNMP6_FILE = "/proc/thread-self/net/snmp6"
SNMP6_PROTOCOLS = ("Udplite6", "Icmp6", "Udp6", "Ip6")
"""Prefixes of /proc/net/snmp6 names, longest first (Udplite6 before Udp6)."""
SOFTNET_FILE = "/proc/net/softnet_stat"

SOFTNET_COLUMNS = {
    0: "processed",
    1: "dropped",  # enqueue_to_backlog found input_pkt_queue full (netdev_max_backlog)
    2: "time_squeeze",  # net_rx_action ran out of budget or time
    8: "cpu_collision",
    9: "received_rps",
    10: "flow_limit_count",
    11: "backlog_len",
    12: "cpu",
    13: "input_qlen",
    14: "process_qlen",
}
"""Columns of /proc/net/softnet_stat by position (3-7 are unused leftovers of fastroute)."""

QDISC_QUEUE_KEYS = ("qlen", "backlog", "drops", "requeues", "overlimits")


# --------------------------------------------------------------------------- /proc


def parse_snmp(text: str) -> dict[str, int]:
    """``Proto: names`` / ``Proto: values`` line pairs → {"Proto.Name": value}."""
    counters: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, names = header.partition(":")
        vproto, _, numbers = values.partition(":")
        if proto != vproto:
            continue
        pairs = zip(names.split(), numbers.split(), strict=False)
        try:  # every field is a number (Tcp.MaxConn may be -1): the whole line at once
            counters.update({f"{proto}.{name}": int(number) for name, number in pairs})
        except ValueError:  # a field that is not: keep the others
            for name, number in zip(names.split(), numbers.split(), strict=False):
                with contextlib.suppress(ValueError):
                    counters[f"{proto}.{name}"] = int(number)
    return counters


def parse_snmp6(text: str) -> dict[str, int]:
    """``Ip6InReceives  12`` lines of /proc/net/snmp6 → {"Ip6.InReceives": 12}, named like snmp's ``Ip.*``.

    Icmp6's per-type lines (``Icmp6InType135``) are kept as they are (``Icmp6.InType135``).
    """
    counters: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        for proto in SNMP6_PROTOCOLS:
            if parts[0].startswith(proto):
                counters[f"{proto}.{parts[0][len(proto):]}"] = int(parts[1])
                break
    return counters


def _read_snmp_here() -> dict[str, int]:
    counters: dict[str, int] = {}
    for path in SNMP_FILES:
        with open(path) as f:
            counters.update(parse_snmp(f.read()))
    with contextlib.suppress(FileNotFoundError), open(SNMP6_FILE) as f:  # a kernel without IPv6 has no snmp6
        counters.update(parse_snmp6(f.read()))
    return counters


@contextlib.contextmanager
def _inside(namespace: str | None) -> Iterator[None]:
    if namespace is None:
        yield
    else:
        with netns.entered(namespace):
            yield


def snmp(namespace: str | None) -> dict[str, int]:
    """Protocol counters (snmp + netstat + snmp6) of ``namespace`` (the caller's own when None)."""
    with _inside(namespace):
        return _read_snmp_here()


def parse_softnet(text: str) -> list[dict[str, Any]]:
    """One dict per online CPU; columns this module does not know go to ``extra``."""
    rows: list[dict[str, Any]] = []
    for index, line in enumerate(text.splitlines()):
        values = [int(column, 16) for column in line.split()]
        row: dict[str, Any] = {"cpu": index}  # older kernels have no cpu column
        extra: dict[str, int] = {}
        for position, value in enumerate(values):
            name = SOFTNET_COLUMNS.get(position)
            if name is None:
                extra[f"col{position}"] = value
            else:
                row[name] = value
        row["extra"] = extra
        rows.append(row)
    return rows


def softnet() -> list[dict[str, Any]]:
    """Per-CPU backlog statistics; ``dropped`` is the netdev_max_backlog drop count."""
    with open(SOFTNET_FILE) as f:
        return parse_softnet(f.read())


# --------------------------------------------------------------------------- netlink


TCA_KIND, TCA_STATS, TCA_STATS2 = 1, 3, 7
TCA_STATS_BASIC, TCA_STATS_QUEUE = 1, 3
_TCMSG = struct.Struct("=BxxxiIII")  # tcmsg: family, ifindex, handle, parent, info
_GNET_BASIC = struct.Struct("=QI")  # gnet_stats_basic: bytes, packets
_GNET_QUEUE = struct.Struct("=IIIII")  # gnet_stats_queue: qlen, backlog, drops, requeues, overlimits
_TC_STATS = struct.Struct("=QIIIIIII")  # tc_stats: bytes, packets, drops, overlimits, bps, pps, qlen, backlog


@contextlib.contextmanager
def _netlink(namespace: str | None) -> Iterator[NodeLinks]:
    """labctl's own rtnetlink socket in ``namespace`` (the caller's when None).

    Not pyroute2: its socket costs 20 ms to open, dump and close here (a check
    reads every node's counters twice), and importing it 0.1 s of a command.
    """
    handle = NodeLinks(namespace) if namespace is not None else NodeLinks("", nl=Netlink())
    try:
        yield handle
    finally:
        handle.close()


def _links(handle: NodeLinks) -> dict[str, dict[str, int]]:
    return {name: info.stats for name, info in handle.links().items() if info.stats}


def _handle(value: int) -> str:
    if value == 0xFFFFFFFF:
        return "root"
    return f"{value >> 16:x}:{value & 0xFFFF:x}" if value & 0xFFFF else f"{value >> 16:x}:"


def _qdiscs(handle: NodeLinks) -> dict[str, dict[str, dict[str, int]]]:
    if not handle.index:
        handle.refresh()
    names = {index: name for name, index in handle.index.items()}
    result: dict[str, dict[str, dict[str, int]]] = {}
    for _, data, offset in handle.nl.dump(RTM_GETQDISC, _TCMSG.pack(0, 0, 0, 0, 0)):
        _, index, qhandle, parent, _ = _TCMSG.unpack_from(data, offset)
        attrs = attributes(data, offset + _TCMSG.size)
        kind = attrs[TCA_KIND].split(b"\0", 1)[0].decode() if TCA_KIND in attrs else ""
        label = f"{kind} {_handle(qhandle)} parent {_handle(parent)}"
        result.setdefault(names.get(index, str(index)), {})[label] = _qdisc_counters(attrs)
    return result


DEFAULT_QDISCS = frozenset({"noqueue", "pfifo_fast", "mq", "noop"})
"""What an interface has before anyone sets tc: status shows none of them (labctl.lab.tc.status_here)."""


def qdisc_kinds(handle: NodeLinks) -> list[tuple[int, str]]:
    """(ifindex, kind) of every qdisc in the handle's namespace: one dump on labctl's own socket."""
    found = []
    for data in handle.nl.dump_all(RTM_GETQDISC, _TCMSG.pack(0, 0, 0, 0, 0)):  # each message: payload at 16
        _, index, _, _, _ = _TCMSG.unpack_from(data, 16)
        attrs = attributes(data, 16 + _TCMSG.size, frozenset({TCA_KIND}))
        found.append((index, attrs[TCA_KIND].split(b"\0", 1)[0].decode() if TCA_KIND in attrs else ""))
    return found


def _qdisc_counters(attrs: Mapping[int, bytes]) -> dict[str, int]:
    counters: dict[str, int] = {}
    if TCA_STATS2 in attrs:
        stats2 = attributes(attrs[TCA_STATS2])
        basic = stats2.get(TCA_STATS_BASIC, b"")
        nbytes, packets = _GNET_BASIC.unpack_from(basic) if len(basic) >= _GNET_BASIC.size else (0, 0)
        queue = stats2.get(TCA_STATS_QUEUE, b"")
        values = _GNET_QUEUE.unpack_from(queue) if len(queue) >= _GNET_QUEUE.size else (0,) * 5
        counters["packets"] = packets
        counters["bytes"] = nbytes
        counters.update(zip(QDISC_QUEUE_KEYS, values, strict=True))
        return counters
    legacy = attrs.get(TCA_STATS, b"")
    nbytes, packets, drops, _, _, _, qlen, _ = (
        _TC_STATS.unpack_from(legacy) if len(legacy) >= _TC_STATS.size else (0,) * 8
    )
    counters.update(packets=packets, bytes=nbytes, drops=drops, qlen=qlen)
    return counters


def link_stats(namespace: str | None) -> dict[str, dict[str, int]]:
    """stats64 of every interface of ``namespace``, by name, from one netlink dump."""
    with _netlink(namespace) as ipr:
        return _links(ipr)


def qdisc_stats(namespace: str | None) -> dict[str, dict[str, dict[str, int]]]:
    """{ifname: {"<kind> <handle> parent <parent>": counters}} for every qdisc of ``namespace``.

    Qdiscs are listed one by one, not summed: a classful root counts what
    its children also count.
    """
    with _netlink(namespace) as ipr:
        return _qdiscs(ipr)


# --------------------------------------------------------------------------- snapshots


@dataclass
class NamespaceCounters:
    snmp: dict[str, int]
    links: dict[str, dict[str, int]]
    qdisc: dict[str, dict[str, dict[str, int]]]

    @classmethod
    def read(cls, namespace: str | None) -> NamespaceCounters:
        with _netlink(namespace) as ipr:
            links, qdisc = _links(ipr), _qdiscs(ipr)
        return cls(snmp(namespace), links, qdisc)

    def view(self) -> dict[str, Any]:
        """The three tables by name, not copied: :func:`delta` only reads them (``asdict`` deep-copied every
        counter of every snapshot, a sixth of a serial run's CPU)."""
        return {"snmp": self.snmp, "links": self.links, "qdisc": self.qdisc}


@dataclass
class Snapshot:
    """Every counter of a set of namespaces, plus the host's softnet_stat, at one moment."""

    taken_at: float
    """time.monotonic() at the start of the snapshot (same clock as trace timestamps)."""
    namespaces: dict[str, NamespaceCounters] = field(default_factory=dict)
    softnet: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def take(cls, namespaces: Iterable[str]) -> Snapshot:
        snapshot = cls(time.monotonic())
        for name in namespaces:
            snapshot.namespaces[name] = NamespaceCounters.read(name)
        snapshot.softnet = softnet()
        return snapshot


def _diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """after - before for every int that changed, recursively; keys new in ``after`` count from 0.

    Most values are ints that did not move (a node has ~400 protocol counters): those cost one lookup and
    one comparison, the type tests only the few that differ."""
    changed: dict[str, Any] = {}
    get = before.get
    for key, value in after.items():
        old = get(key)
        if value == old and type(value) is int:
            continue
        if isinstance(value, Mapping):
            sub = _diff(old if isinstance(old, Mapping) else {}, value)
            if sub:
                changed[key] = sub
        elif isinstance(value, int) and not isinstance(value, bool):
            diff = value - (old if isinstance(old, int) else 0)
            if diff:
                changed[key] = diff
    return changed


def _softnet_by_cpu(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {str(row["cpu"]): {k: v for k, v in row.items() if k != "cpu"} for row in rows}


def delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What changed between two snapshots, as plain JSON-ready dicts (unchanged counters omitted)."""
    namespaces = _diff(
        {name: c.view() for name, c in before.namespaces.items()},
        {name: c.view() for name, c in after.namespaces.items()},
    )
    result: dict[str, Any] = {"seconds": round(after.taken_at - before.taken_at, 6)}
    if namespaces:
        result["namespaces"] = namespaces
    cpus = _diff(_softnet_by_cpu(before.softnet), _softnet_by_cpu(after.softnet))
    if cpus:
        result["softnet"] = cpus
    return result


def by_node(delta_: dict[str, Any], namespaces: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """A :func:`delta` per node, flat: ``Udp.NoPorts``, ``eth0.rx_packets``, ``eth0.qdisc.drops``.

    ``namespaces`` maps node names to their namespaces; the qdisc counters of
    one interface are summed over its qdiscs.
    """
    result: dict[str, dict[str, int]] = {}
    for node, ns in namespaces.items():
        data = delta_.get("namespaces", {}).get(ns, {})
        flat: dict[str, int] = dict(data.get("snmp", {}))
        for ifname, stats in data.get("links", {}).items():
            for key, value in stats.items():
                flat[f"{ifname}.{key}"] = value
        for ifname, qdiscs in data.get("qdisc", {}).items():
            for stats in qdiscs.values():
                for key, value in stats.items():
                    flat[f"{ifname}.qdisc.{key}"] = flat.get(f"{ifname}.qdisc.{key}", 0) + value
        result[node] = flat
    return result


def activity(handle: NodeLinks) -> tuple[int, int]:
    """(every packet and drop the namespace's interfaces and qdiscs have counted, packets its qdiscs hold now).

    The first number moves whenever a packet crosses, enters or is dropped at one of the namespace's
    devices; the second is what a qdisc still holds (a shaper releases it later, on a timer).  An
    observation window waits until neither moves (labctl/evidence/window.py, ``Window.settle``).
    """
    moved = sum(sum(stats.values()) for stats in _links(handle).values())
    held = 0
    for qdiscs in _qdiscs(handle).values():
        for counts in qdiscs.values():
            moved += counts.get("packets", 0) + counts.get("drops", 0)
            held += counts.get("qlen", 0)
    return moved, held


def backlog() -> int:
    """Packets waiting in every CPU's backlog now (softnet_stat's backlog_len; 0 where the kernel lacks it)."""
    return sum(row.get("backlog_len", 0) for row in softnet())
