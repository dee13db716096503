"""The IPv4 stages above the device layer on one node: ip_rcv, hooks, routing, transport, socket."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labctl.lab.trace.frame import IP_PROTOCOLS, FrameInfo
from labctl.lab.trace.model import Evidence, Stage
from labctl.lab.trace.placement import Placed
from labctl.lab.trace.rules import hook_of, rule_words
from labctl.lab.trace.vocabulary import CONSUMERS, LOCAL_FUNCTIONS, STAGE_COUNTERS

if TYPE_CHECKING:
    from labctl.lab.trace.path import PathBuilder


class UpperLayers:
    """The IPv4 stages on one node after netif_receive_skb: what the evidence allows, no more."""

    def __init__(
        self,
        builder: PathBuilder,
        stages: list[Stage],
        node: str,
        device: str,
        received: Placed,
        next_tx: Placed | None,
        terminal: Placed | None,
        end_stage: str | None,
        info: FrameInfo | None,
    ) -> None:
        self.b = builder
        self.k = builder.k
        self.stages = stages
        self.node = node
        self.device = device
        self.received = received
        self.next_tx = next_tx
        self.terminal = terminal
        self.end_stage = end_stage
        self.info = info
        drop = terminal if terminal is not None and terminal.event.key == "skb:kfree_skb" else None
        self.reason = drop.event.reason if drop else None
        self.function = drop.event.function if drop else None
        consume = terminal if terminal is not None and terminal.event.key == "skb:consume_skb" else None
        self.consumed_by = consume.event.function if consume else None

    def add(self, name: str, evidence: Evidence, detail: str = "", counters: dict[str, int] | None = None) -> None:
        self.stages.append(Stage(name, self.node, self.device, evidence, detail, counters=counters or {}))

    def run(self) -> str | None:
        """Add the stages; returns the stage a drop stopped the packet at, when it is one of them."""
        ip_moved = self.k.moved(self.node, STAGE_COUNTERS["ip_rcv"])
        ip_evidence: Evidence = "traced" if self.end_stage == "ip_rcv" else ("counted" if ip_moved else "inferred")
        self.add("ip_rcv", ip_evidence, counters=ip_moved)
        if self.end_stage == "ip_rcv":
            return "ip_rcv"
        nf_hook = self._netfilter_hook() if self.end_stage == "netfilter" else None
        self.hook("PREROUTING")
        if nf_hook == "PREROUTING":
            return nf_hook
        if self.end_stage == "netfilter" and nf_hook is None:
            self.add("netfilter", "traced", "hook not identified: no DROP rule or policy counted")
            return "netfilter"
        route = self._route(nf_hook)
        if route is None:
            return None
        self._routing(route)
        if route == "error":
            return "routing"
        if route == "local":
            self.hook("LOCAL_IN")
            if nf_hook == "LOCAL_IN":
                return nf_hook
            return self._transport()
        self.hook("FORWARD")
        if nf_hook == "FORWARD":
            return nf_hook
        self.hook("POSTROUTING")
        return "POSTROUTING" if nf_hook == "POSTROUTING" else None

    def hook(self, hook: str) -> None:
        """A netfilter hook: counted when a rule or policy of that hook moved, inferred otherwise."""
        if not self.b.rules_known:
            self.add(hook, "inferred")
            return
        rules = self.k.hook_rules(self.node, hook)
        moved = [r for r in rules if r.packets > 0]
        if moved:
            detail = "; ".join(rule_words(r) for r in moved)
            self.add(hook, "counted", detail, {r.key: r.packets for r in moved})
        else:
            self.add(hook, "inferred", "no rule counted it" if rules else "no iptables rules")

    def _netfilter_hook(self) -> str | None:
        """The hook whose DROP (rule, REJECT or policy) counted packets during the trace."""
        order = ["PREROUTING", "LOCAL_IN", "FORWARD", "POSTROUTING"]
        found = set()
        for rule in self.k.rules.get(self.node, {}).values():
            if rule.packets > 0 and rule.target in ("DROP", "REJECT"):
                hook = hook_of(rule, self.k.rules.get(self.node, {}))
                if hook is not None:
                    found.add(hook)
        return next((hook for hook in order if hook in found), None)

    def _route(self, nf_hook: str | None) -> str | None:
        if self.end_stage == "routing":
            return "error"
        if nf_hook == "LOCAL_IN":
            return "local"
        if nf_hook in ("FORWARD", "POSTROUTING"):
            return "forward"
        if self.next_tx is not None:
            return "forward"
        if self.end_stage in ("L4", "socket") or self.function in LOCAL_FUNCTIONS:
            return "local"
        if self.consumed_by in CONSUMERS or self.consumed_by in LOCAL_FUNCTIONS:
            return "local"
        if self.terminal is None:
            if self.k.delta(self.node, "Ip.InDelivers"):
                return "local"
            if self.k.delta(self.node, "Ip.ForwDatagrams"):
                return "forward"
        return None

    def _routing(self, route: str) -> None:
        fib = self._fib()
        moved = self.k.moved(self.node, STAGE_COUNTERS[f"routing:{route}"])
        if route == "error":
            detail = {
                "IP_INADDRERRORS": "not local, and forwarding is off (ip_error)",
                "IP_INNOROUTES": "no route (ip_error)",
                "IP_RPFILTER": "reverse-path filter (rp_filter)",
            }.get(self.reason or "", f"refused ({self.function})")
            self.add("routing", "traced", detail, moved)
            return
        detail = "local" if route == "local" else f"forward → {self.next_tx.device if self.next_tx else '?'}"
        if fib is not None:
            self.add("routing", "traced", detail, moved)
            self.stages[-1].note = f"fib_table_lookup table {fib.fields.get('tb_id')} → dev {fib.fields.get('name')}"
        else:
            self.add("routing", "counted" if moved else "inferred", detail, moved)

    def _fib(self) -> Any:
        later = next((x.event for x in (self.next_tx, self.terminal) if x is not None), None)
        index = self.k.ifindex.get(self.node, {}).get(self.device)
        return self.k.fib_after(self.received.event, later, index, self.info)

    def _transport(self) -> str | None:
        protocol = self.info.protocol if self.info is not None else _protocol_from(self.function or self.consumed_by)
        name = IP_PROTOCOLS.get(protocol or -1)
        if name is None:
            if self.end_stage == "L4":
                self.add(self.function or "L4", "traced")
                return self.function
            return None
        moved = self.k.moved(self.node, STAGE_COUNTERS[name])
        evidence: Evidence = "traced" if self.end_stage == "L4" else ("counted" if moved else "inferred")
        self.add(name, evidence, counters=moved)
        if self.end_stage == "L4":
            return name
        if name != "UDP":
            return None
        dport = self.info.dport if self.info is not None else None
        where = f"udp port {dport}" if dport else ""
        if self.end_stage == "socket":
            _, drops = self.k.queued_on(self.node, dport)
            moved = self.k.moved(self.node, STAGE_COUNTERS["socket"])
            if drops:
                moved["socket.drops"] = drops
            self.add("socket", "traced", where, moved)
            return "socket"
        if self.consumed_by in CONSUMERS and CONSUMERS[self.consumed_by][0] == "delivered":
            self.add("socket", "traced", where)
        elif self.terminal is None:
            waiting, _ = self.k.queued_on(self.node, dport)
            read = self.k.delta(self.node, "Udp.InDatagrams")
            if waiting:
                self.add("socket", "counted", where, {"socket.rx_queue_bytes": waiting})
            elif read:
                self.add("socket", "counted", where, {"Udp.InDatagrams": read})
        return None


def _protocol_from(function: str | None) -> int | None:
    if not function:
        return None
    for prefix, proto in (("udp", 17), ("__udp", 17), ("tcp", 6), ("icmp", 1)):
        if function.startswith(prefix):
            return proto
    return None
