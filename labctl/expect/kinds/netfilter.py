"""hooks: the ordered netfilter walk of each packet (conntrack entries are kinds/conntrack.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from labctl.expect.base import (
    Issue,
    JudgeContext,
    Kind,
    LabView,
    MachineFacts,
    Needs,
    Row,
    WalkSpec,
    register,
)
from labctl.expect.walks import WalkForm, form_steps, judge_walks, walk_counts

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


NFT_FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")


def full_name(step: str) -> str:
    """'filter:INPUT' is an iptables step ('ip:filter:INPUT'); 'ip6:filter:INPUT' an ip6tables one;
    'bridge:nat:PREROUTING' an ebtables one; 'nft:inet:filter:input' a base chain of the node's nft ruleset."""
    return step if step.count(":") == 2 or step.startswith("nft:") else f"ip:{step}"


def step_issue(step: str, facts: MachineFacts) -> str | None:
    if step.startswith("nft:"):
        parts = step.split(":")
        if len(parts) != 4 or parts[1] not in NFT_FAMILIES or not parts[2] or not parts[3]:
            return f"{step!r} is not 'nft:FAMILY:TABLE:CHAIN' (family one of {', '.join(NFT_FAMILIES)})"
        return None
    parts = full_name(step).split(":")
    if len(parts) != 3 or parts[0] not in ("ip", "ip6", "bridge"):
        return (
            f"{step!r} is not 'table:CHAIN' (iptables), 'ip6:table:CHAIN' (ip6tables) or 'bridge:table:CHAIN' "
            "(ebtables)"
        )
    family, table, chain = parts
    tables = facts.bridge_tables if family == "bridge" else facts.ip_tables  # ip6tables has iptables' tables
    if table not in tables:
        return f"{family} has no traceable table {table!r} (tables: {', '.join(tables)})"
    if chain not in tables[table]:
        return f"{family} {table} has no built-in chain {chain!r} (chains: {', '.join(tables[table])})"
    return None


@register
class Hooks(Kind):
    key = "hooks"
    schema = Annotated[dict[str, WalkForm], Field(min_length=1)]
    doc = (
        "Per node, the netfilter walk of each packet of the check: exactly this list of 'table:CHAIN' / "
        "'ip6:table:CHAIN' / 'bridge:table:CHAIN' / 'nft:FAMILY:TABLE:CHAIN' ({contains: [...]} or "
        "{packets: [[...], ...]} for the other forms)."
    )
    order = 90

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return [((node,), f"unknown node {node!r}") for node in value if node not in lab.nodes]

    def machine(self, value: Any, facts: MachineFacts) -> list[Issue]:
        issues: list[Issue] = []
        for node, form in value.items():
            for step in form_steps(form):
                problem = step_issue(step, facts)
                if problem:
                    issues.append(((node,), problem))
        return issues

    def needs(self, value: Any, needs: Needs) -> None:
        for node, form in value.items():
            steps = [full_name(s) for s in form_steps(form)]
            spec = needs.walks.setdefault(node, WalkSpec())
            spec.bridge_tables |= {s.split(":")[1] for s in steps if s.startswith("bridge:")}
            spec.nat |= any(s.split(":")[1] == "nat" for s in steps if not s.startswith("nft:"))
            spec.nft |= any(s.startswith("nft:") for s in steps)
            spec.ip6 |= any(s.startswith("ip6:") for s in steps)
            spec.ip = any(not s.startswith(("nft:", "ip6:")) for s in steps) or not (spec.nft or spec.ip6)

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows = []
        for node, form in value.items():
            walks = [[s.name for s in walk] for walk in ev.walks.get(node, ())]
            wanted = _normalised(form)
            ok, detail = judge_walks(wanted, walks)
            expected = wanted if isinstance(wanted, list) else wanted.model_dump(exclude_none=True)
            hint = "" if ok else _family_hint([full_name(s) for s in form_steps(form)], ctx)
            rows.append(
                Row(f"{node} netfilter walk of each packet", expected, walk_counts(walks), ok, hint, detail=detail)
            )
        return rows


ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD


def _family_hint(steps: list[str], ctx: JudgeContext) -> str:
    """An IPv6 check walked with iptables steps (or the reverse): say which tables see its packets."""
    protocols = ctx.traffic_protocols
    ip_steps = any(s.startswith("ip:") for s in steps)
    ip6_steps = any(s.startswith("ip6:") for s in steps)
    if ETH_P_IPV6 in protocols and ETH_P_IP not in protocols and ip_steps and not ip6_steps:
        return "the check's traffic is IPv6: ip6tables steps are written ip6:TABLE:CHAIN; iptables never sees it"
    if ETH_P_IP in protocols and ETH_P_IPV6 not in protocols and ip6_steps and not ip_steps:
        return "the check's traffic is IPv4: iptables steps are written TABLE:CHAIN; ip6tables never sees it"
    return ""


def _normalised(form: Any) -> Any:
    if isinstance(form, list):
        return [full_name(s) for s in form]
    return form.model_copy(
        update={
            k: ([full_name(s) for s in v] if k != "packets" else [[full_name(s) for s in w] for w in v])
            for k, v in form.model_dump(exclude_none=True).items()
        }
    )
