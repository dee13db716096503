"""Judge an observation against a check's expectations.

Each expectation present in the lab file becomes one Evidence row with what
was expected, what the kernel showed and whether they agree; a check passes
only when every row does, so a check with no expectations cannot pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from labctl.kernel import netns
from labctl.kernel.links import NodeLinks
from labctl.topology.checks import Check, matches, parse_bound
from labctl.topology.model import Topology
from labctl.verify.observe import Observation


@dataclass
class Evidence:
    what: str
    expected: Any
    observed: Any
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "expected": self.expected, "observed": self.observed, "ok": self.ok}


def _subsequence(wanted: list[str], seen: list[str]) -> bool:
    it = iter(seen)
    return all(any(item == have for have in it) for item in wanted)


def _needs_whole_trace(check: Check) -> bool:
    """Lost trace events can only lower what a trace counts: a lower bound survives them, nothing else does."""
    exp = check.expect
    counts = list(exp.events.values()) + list(exp.drops.values())
    if exp.dropped is not None:
        counts.append(exp.dropped.count)
    return bool(exp.stages) or any(parse_bound(c)[1] is not None for c in counts)


def _stages_in_order(wanted: list[str], path: list[tuple[str, set[str]]]) -> bool:
    it = iter(path)
    return all(any(stage == key or stage in named for key, named in it) for stage in wanted)


def _drop_matches(event: Any, reason: str, at: str | None) -> bool:
    if event.reason != reason:
        return False
    if at is None:
        return True
    return event.function in at.split("|")


def _mac_of(topo: Topology, ref: str) -> str:
    """'node:iface' names that interface's MAC; anything else is a MAC already."""
    node, sep, ifname = ref.partition(":")
    if sep and node in topo.nodes and len(ref) < 17:
        with NodeLinks(netns.namespace_name(topo.name, node)) as handle:
            return handle.links()[ifname].mac
    return ref.lower()


def evaluate(topo: Topology, check: Check, seen: Observation) -> list[Evidence]:
    rows: list[Evidence] = []
    exp = check.expect
    drops = [e for e in seen.events if e.key == "skb:kfree_skb"]
    if exp.delivered is not None:
        rows.append(
            Evidence("delivered to the listener", exp.delivered, seen.delivered, matches(exp.delivered, seen.delivered))
        )
    if exp.dropped is not None:
        pool = drops + (seen.timer_drops if exp.dropped.anywhere else [])
        hit = [e for e in pool if _drop_matches(e, exp.dropped.reason, exp.dropped.at)]
        where = f" at {exp.dropped.at}" if exp.dropped.at else ""
        observed = sorted({f"{e.reason} at {e.function}" for e in drops}) or "no drop"
        rows.append(
            Evidence(
                f"dropped: {exp.dropped.reason}{where}",
                exp.dropped.count,
                {"matching": len(hit), "drops": observed},
                matches(exp.dropped.count, len(hit)),
            )
        )
    by_reason = Counter(e.reason for e in drops)
    for reason, bound in exp.drops.items():
        rows.append(
            Evidence(
                f"drops with reason {reason}", bound, by_reason.get(reason, 0), matches(bound, by_reason.get(reason, 0))
            )
        )
    for node, wanted in exp.counters.items():
        for key, bound in wanted.items():
            if key not in seen.counter_names.get(node, set()):
                # a typo must not read as "did not move"
                rows.append(Evidence(f"{node} counter {key} (delta)", bound, "no such counter", False))
                continue
            value = seen.counters.get(node, {}).get(key, 0)
            rows.append(Evidence(f"{node} counter {key} (delta)", bound, value, matches(bound, value)))
    if exp.softnet_dropped is not None:
        rows.append(
            Evidence(
                "softnet_stat dropped (delta, all CPUs)",
                exp.softnet_dropped,
                seen.softnet_dropped,
                matches(exp.softnet_dropped, seen.softnet_dropped),
            )
        )
    for key, bound in exp.captured.items():
        got = seen.captures[key]
        rows.append(Evidence(f"captured on {key}", bound, got.frames, matches(bound, got.frames) and got.dropped == 0))
    for key, direction in exp.captured_direction.items():
        dirs = seen.captures[key].directions
        rows.append(Evidence(f"capture direction on {key}", direction, dirs, bool(dirs) and set(dirs) == {direction}))
    if exp.stages:
        # a stage may name its device (net:netif_receive_skb@br0); match each event on either form
        paths = [[(e.key, {f"{e.key}@{d}" for d in e.devices}) for e in chain.events] for chain in seen.chains]
        ok = any(_stages_in_order(exp.stages, path) for path in paths)
        shown = [[f"{key}@{sorted(named)[0].split('@')[1]}" if named else key for key, named in p] for p in paths]
        best = max(shown, key=lambda p: sum(any(s in x for x in p) for s in exp.stages), default=[])
        rows.append(Evidence("path stages in order", exp.stages, best, ok))
    keys = Counter(e.key for e in seen.events)
    keys.update(f"{e.key}@{dev}" for e in seen.events for dev in e.devices)
    for key, bound in exp.events.items():
        if key.partition("@")[0] not in seen.traced_events:
            rows.append(Evidence(f"trace events {key}", bound, "not traced (no such tracepoint here)", False))
            continue
        rows.append(Evidence(f"trace events {key}", bound, keys.get(key, 0), matches(bound, keys.get(key, 0))))
    if exp.tap_after_qdisc is not None:
        node, _, ifname = exp.tap_after_qdisc.partition(":")
        out = seen.captures[exp.tap_after_qdisc].directions.get("out", 0)
        qdisc_drops = seen.counters.get(node, {}).get(f"{ifname}.qdisc.drops", 0)
        sent = seen.sent_frames + sum(r.sent for r in seen.send_results)
        rows.append(
            Evidence(
                f"AF_PACKET on {exp.tap_after_qdisc} sees only what the qdisc let through",
                f"captured out + qdisc drops = {sent} sent",
                {"captured_out": out, "qdisc_drops": qdisc_drops},
                out + qdisc_drops == sent and qdisc_drops > 0,
            )
        )
    for table, source in (("iptables", seen.rules), ("ebtables", seen.ebtables)):
        wanted_rules = exp.rules if table == "iptables" else exp.ebtables
        for node, wanted in wanted_rules.items():
            for key, bound in wanted.items():
                delta = source.get(node, {}).get(key)
                rows.append(
                    Evidence(
                        f"{node} {table} {key} packets (delta)",
                        bound,
                        delta,
                        delta is not None and matches(bound, delta),
                    )
                )
    if exp.send_error is not None:
        errors = sorted({r.error_name for r in seen.send_results if r.error_name})
        ok = errors == [] if exp.send_error == "none" else exp.send_error in errors
        rows.append(Evidence("sender's errno", exp.send_error, errors or "none", ok))
    for key, refs in exp.fdb.items():
        wanted_macs = [_mac_of(topo, ref) for ref in refs]
        learnt = seen.fdb.get(key, [])
        rows.append(Evidence(f"fdb of {key} learnt", wanted_macs, learnt, all(m in learnt for m in wanted_macs)))
    for node, steps in exp.hooks.items():
        wanted_steps = [s if s.count(":") == 2 else f"ip:{s}" for s in steps]
        traced = seen.hooks.get(node, [])
        rows.append(Evidence(f"{node} netfilter hook order", wanted_steps, traced, _subsequence(wanted_steps, traced)))
    if exp.conntrack is not None:
        rows.append(
            Evidence("conntrack entries", exp.conntrack, seen.conntrack, matches(exp.conntrack, seen.conntrack))
        )
    if exp.reachable is not None:
        ok = bool(seen.ping_ok) and all(r == exp.reachable for r in seen.ping_ok)
        rows.append(Evidence("ping replies", "all" if exp.reachable else "none", seen.ping_ok, ok))
    if exp.received_from is not None:
        ok = bool(seen.sources) and set(seen.sources) == {exp.received_from}
        rows.append(Evidence("listener saw source", exp.received_from, sorted(set(seen.sources)), ok))
    if seen.lost_events and _needs_whole_trace(check):
        rows.append(Evidence("trace complete (no lost events)", 0, seen.lost_events, False))
    if not rows:
        rows.append(Evidence("the check states at least one expectation", "an expectation", "none", False))
    return rows
