"""Converge each interface's traffic control to the lab file: same -> nothing, changed -> rebuilt, gone -> removed.

"Same" is the fingerprint of the interface's ``tc:`` as last built (kept in
the lab's state) *and* the kernel still holding that root and ingress-side
qdisc kind -- a tree changed by hand under another kind is rebuilt.  A tc tree
is rebuilt whole (qdiscs removed, which removes their classes and filters,
then made again): the kernel replaces nothing across kinds, and a second
``up`` with the same file must not fail with "File exists".
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from labctl.kernel import netns
from labctl.kernel import tc as ktc
from labctl.kernel.counters import DEFAULT_QDISCS

if TYPE_CHECKING:
    from labctl.kernel.links import NodeLinks
    from labctl.topology.tc import Filter, Qdisc, TcConfig


def fingerprint(config: TcConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def qdisc_params(q: Qdisc) -> dict[str, Any]:
    """pyroute2's parameters for the root qdisc (rates in bytes/s, sizes in bytes, times in microseconds)."""
    from labctl.topology.tc import parse_rate, parse_size, parse_time

    if q.kind == "tbf":
        params: dict[str, Any] = {"rate": parse_rate(q.rate), "burst": parse_size(q.burst or "1600b")}
        if q.latency is not None:
            params["latency"] = parse_time(q.latency)
        else:
            params["limit"] = q.limit if isinstance(q.limit, int) else parse_size(q.limit)
        return params
    if q.kind == "pfifo":
        return {"limit": int(q.limit)} if q.limit is not None else {}
    if q.kind == "htb":
        return {"default": int(q.default, 16)} if q.default else {"default": 0}
    if q.kind == "fq_codel":
        params = {}
        if q.limit is not None:
            params["fqc_limit"] = int(q.limit)
        if q.target is not None:
            params["fqc_target"] = parse_time(q.target)
        if q.interval is not None:
            params["fqc_interval"] = parse_time(q.interval)
        return params
    # netem: delay/jitter in microseconds, loss in percent, limit in packets
    params = {"limit": int(q.limit) if q.limit is not None else 1000}
    if q.delay is not None:
        params["delay"] = parse_time(q.delay)
    if q.jitter is not None:
        params["jitter"] = parse_time(q.jitter)
    if q.loss is not None:
        params["loss"] = float(q.loss.rstrip("%"))
    if q.rate is not None:
        params["rate"] = parse_rate(q.rate)
    return params


def plan(config: TcConfig, index_of: dict[str, int]) -> ktc.TcPlan:
    """The kernel objects of one interface's ``tc:`` (``index_of``: the node's interface indexes, for mirred)."""
    from labctl.topology.tc import parse_classid, parse_rate, parse_size

    result = ktc.TcPlan()
    if config.qdisc is not None:
        result.qdisc = (config.qdisc.kind, qdisc_params(config.qdisc))
        for classid, spec in config.qdisc.classes.items():
            params: dict[str, Any] = {"rate": parse_rate(spec.rate)}
            if spec.ceil is not None:
                params["ceil"] = parse_rate(spec.ceil)
            if spec.burst is not None:
                params["burst"] = parse_size(spec.burst)
            if spec.prio is not None:
                params["prio"] = spec.prio
            result.classes.append((parse_classid(classid), params))
    if config.clsact:
        result.hook = "clsact"
    elif config.ingress:
        result.hook = "ingress"
    for number, flt in enumerate(config.filters):
        result.filters.append(_filter(flt, number, config, index_of))
    return result


def _filter(flt: Filter, number: int, config: TcConfig, index_of: dict[str, int]) -> ktc.FilterPlan:
    from labctl.topology.tc import MirredAction, U32Match, parse_classid

    if flt.attach == "root":
        parent = ktc.ROOT_HANDLE
    elif flt.attach == "egress":
        parent = ktc.CLSACT_EGRESS
    else:
        parent = ktc.CLSACT_INGRESS if config.clsact else ktc.INGRESS_HANDLE
    prio = flt.prio or number + 1
    what = f"{flt.kind} filter {number + 1} ({flt.attach})"
    classid = parse_classid(flt.classid) if flt.classid else None
    if flt.kind == "bpf":
        assert isinstance(flt.match, str)
        verdict = None if classid is not None else (ktc.TC_ACT_SHOT if flt.action == "drop" else ktc.TC_ACT_OK)
        return ktc.FilterPlan(
            "bpf", parent, prio, ktc.ETH_P_ALL, bpf=ktc.bpf_program(flt.match, verdict),
            bpf_name=f"labctl:{flt.match}", classid=classid, what=what,
        )  # fmt: skip
    params: dict[str, Any] = {}
    if isinstance(flt.action, MirredAction):
        params["action"] = {
            "kind": "mirred",
            "direction": "egress",
            "action": flt.action.mirred.mode,
            "ifindex": index_of[flt.action.mirred.to],
        }
    elif flt.action is not None:
        params["action"] = {"kind": "gact", "action": "ok" if flt.action == "pass" else "drop"}
    if flt.kind == "u32":
        assert isinstance(flt.match, U32Match)
        m = flt.match
        params["keys"] = ktc.u32_keys(m.protocol, m.src, m.dst, m.sport, m.dport)
        params["target"] = classid if classid is not None else 0
        return ktc.FilterPlan("u32", parent, prio, ktc.ETH_P_IP, params=params, what=what)
    if flt.kind == "flower":
        from labctl.kernel import tc_flower

        tc_flower.register()
        assert isinstance(flt.match, U32Match)
        m = flt.match
        params.update(ip_proto=m.protocol, src=m.src, dst=m.dst, sport=m.sport, dport=m.dport)
        if classid is not None:
            params["classid"] = classid
        return ktc.FilterPlan("flower", parent, prio, ktc.ETH_P_IP, params=params, what=what)
    return ktc.FilterPlan("matchall", parent, prio, ktc.ETH_P_ALL, params=params, what=what)


def converge(
    handle: NodeLinks, ifname: str, config: TcConfig | None, before: str | None, fresh: bool
) -> tuple[str | None, str | None]:
    """Bring one interface's tc to ``config``; (what was done or None, the fingerprint to remember)."""
    if config is None and before is None:
        return None, None
    handle.ensure_indexes({ifname})
    index = handle.index[ifname]
    wanted = fingerprint(config) if config is not None else None
    if not fresh and wanted is not None and wanted == before:
        root, hook = ktc.root_kind(handle.ipr, index)
        want_root = config.qdisc.kind if config is not None and config.qdisc else None
        want_hook = ("clsact" if config.clsact else "ingress" if config.ingress else None) if config else None
        if root == want_root and hook == want_hook:
            return None, wanted
    if not fresh:
        ktc.clear(handle.ipr, index)
    if config is None:
        return "removed", None
    targets = {f.action.mirred.to for f in config.filters if f.action is not None and not isinstance(f.action, str)}
    handle.ensure_indexes(targets)
    with netns.entered(handle.namespace):
        ktc.build(handle.ipr, handle.namespace, ifname, index, plan(config, dict(handle.index)))
    return ("replaced" if before is not None else "built"), wanted


_DEFAULT_QDISCS = DEFAULT_QDISCS
"""What an interface has before anyone sets tc: not shown by status (kept in counters.py beside
qdisc_kinds, so status decides without importing this module)."""


def _handle(value: int) -> str:
    return f"{value >> 16:x}:{value & 0xFFFF:x}" if value & 0xFFFF else f"{value >> 16:x}:"


def _parent(value: int) -> str:
    return {ktc.TC_H_ROOT: "root", ktc.TC_H_INGRESS: "ingress", ktc.CLSACT_INGRESS: "ingress",
            ktc.CLSACT_EGRESS: "egress"}.get(value, _handle(value))  # fmt: skip


def status_here(ipr: Any) -> dict[int, dict[str, list[str]]]:
    """ifindex -> {qdiscs, classes, filters} as the kernel has them (only interfaces with tc set)."""
    found: dict[int, dict[str, list[str]]] = {}
    for msg in ipr.get_qdiscs():
        kind = msg.get_attr("TCA_KIND")
        if kind in _DEFAULT_QDISCS:
            continue
        entry = found.setdefault(msg["index"], {"qdiscs": [], "classes": [], "filters": []})
        entry["qdiscs"].append(f"{kind} {_handle(msg['handle'])} {_parent(msg['parent'])}")
    for index, entry in found.items():
        for msg in ipr.get_classes(index=index):
            if msg.get_attr("TCA_KIND") == "htb":
                entry["classes"].append(f"htb {_handle(msg['handle'])}")
        parents = [ktc.ROOT_HANDLE, ktc.CLSACT_INGRESS, ktc.CLSACT_EGRESS, ktc.INGRESS_HANDLE]
        for parent in parents:
            try:
                filters = ipr.get_filters(index=index, parent=parent)
            except Exception:  # no such qdisc on this interface: nothing to list
                continue
            for msg in filters:
                kind = msg.get_attr("TCA_KIND")
                if msg["handle"] == 0 or (kind == "u32" and msg["handle"] & 0xFFF == 0):
                    continue  # a prio's head entry, or u32's hash table: not a rule
                entry["filters"].append(f"{kind} {_parent(parent)} pref {msg['info'] >> 16}")
    return found
