"""route: what a node's routing lookup answers for a destination after the traffic (``ip route get``)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from labctl.expect.base import Issue, JudgeContext, Kind, LabView, Needs, Row, register
from labctl.expect.values import Address
from labctl.topology.model import Strict

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


class RouteLookup(Strict):
    """The fields of ``ip route get DST`` a check states; each one given is compared, the rest are not."""

    dev: str | None = None
    via: Literal["none"] | Address | None = None
    """The gateway; ``none`` for a destination on the link (no gateway)."""
    src: Address | None = None
    """The preferred source address the kernel picks."""
    mtu: Annotated[int, Field(ge=68, le=65535)] | Annotated[str, Field(pattern=r"^none$")] | None = None
    """The cached path MTU (a route exception learnt from ICMP); ``none``: no MTU cached."""
    type: str | None = None
    """unicast, local, unreachable, blackhole ... (the route's type)."""
    error: str | None = None
    """No route at all: the lookup's errno (ENETUNREACH, EHOSTUNREACH)."""


NodeRoutes = Annotated[dict[str, Annotated[dict[Address, RouteLookup], Field(min_length=1)]], Field(min_length=1)]


@register
class Route(Kind):
    key = "route"
    schema = NodeRoutes
    doc = (
        "Per node and destination, what `ip route get` answers after the traffic: dev, via (gateway), src, "
        "mtu (a cached PMTU), type, or error."
    )
    order = 80

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        issues: list[Issue] = []
        for node, lookups in value.items():
            if node not in lab.nodes:
                issues.append(((node,), f"unknown node {node!r}"))
                continue
            for dst, wanted in lookups.items():
                if wanted.dev is not None and wanted.dev not in lab.nodes[node]:
                    issues.append(((node, dst, "dev"), f"node {node} has no interface {wanted.dev!r}"))
                if not wanted.model_fields_set:
                    issues.append(((node, dst), "state at least one of dev, via, src, mtu, type, error"))
        return issues

    def needs(self, value: Any, needs: Needs) -> None:
        needs.routes |= {(node, canonical(dst)) for node, lookups in value.items() for dst in lookups}

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        rows: list[Row] = []
        for node, lookups in value.items():
            for dst, wanted in lookups.items():
                got = ev.routes.get(f"{node} {canonical(dst)}")
                for name in sorted(wanted.model_fields_set):
                    expected = getattr(wanted, name)
                    observed = None if got is None else got.get(name)
                    if expected == "none" and name in ("via", "mtu"):
                        expected_value: Any = None
                    else:
                        expected_value = expected
                    ok = got is not None and _same(name, expected_value, observed)
                    rows.append(
                        Row(
                            f"{node} route get {dst}: {name}",
                            expected,
                            "not looked up" if got is None else ("none" if observed is None else observed),
                            ok,
                            hint=_hint(name) if not ok else "",
                        )
                    )
        return rows


def canonical(address: str) -> str:
    """One spelling per address (2001:db8:0::2 and 2001:db8::2 are one lookup, one evidence key)."""
    return str(ipaddress.ip_address(address.strip("[]")))


def _same(name: str, expected: Any, observed: Any) -> bool:
    if name in ("via", "src") and expected is not None and observed is not None:
        return bool(ipaddress.ip_address(str(expected).strip("[]")) == ipaddress.ip_address(str(observed)))
    return bool(expected == observed)


def _hint(name: str) -> str:
    if name == "mtu":
        return "a PMTU is cached only when an ICMP frag-needed / packet-too-big reached the node"
    return ""
