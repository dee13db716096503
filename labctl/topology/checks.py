"""The ``checks`` of a lab file: stage, traffic and what the kernel must show.

A check is data, like the topology: it names nodes and interfaces of the lab
and claim ids of PATHS.md, and states expectations.  Values that are counts
accept an exact integer or a bound (``">=1"``, ``"<=5"``, ``"10..200"``);
exact is the rule, bounds are for what is statistical (backlog overflow).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from labctl.errors import KeyPath, Problem
from labctl.topology.model import NAME_PATTERN, Strict, Topology

_BOUND_RE = re.compile(r"^\s*(?:(>=|<=|>|<|==)\s*(\d+)|(\d+)\s*\.\.\s*(\d+))\s*$")
CLAIM_RE = re.compile(r"^[A-Z]\d+$")


def parse_bound(value: int | str) -> tuple[int, int | None]:
    """A count expectation as an inclusive range (high None = no upper bound)."""
    if isinstance(value, bool):
        raise ValueError("a count is a number or a bound such as '>=1', not true/false")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a count cannot be negative")
        return value, value
    match = _BOUND_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a count: use 3, '>=1', '<=5', '>2' or '10..200'")
    op, num, low, high = match.groups()
    if low is not None:
        if int(low) > int(high):
            raise ValueError(f"{value!r}: the low end is above the high end")
        return int(low), int(high)
    n = int(num)
    return {
        ">=": (n, None),
        ">": (n + 1, None),
        "<=": (0, n),
        "<": (0, max(n - 1, 0)),
        "==": (n, n),
    }[op]


def _count(value: int | str) -> int | str:
    parse_bound(value)
    return value


Count = Annotated[int | str, AfterValidator(_count)]


def matches(bound: int | str, observed: int) -> bool:
    low, high = parse_bound(bound)
    return observed >= low and (high is None or observed <= high)


class Listen(Strict):
    """A UDP socket on a node, to deliver to, fill up, or filter."""

    node: str
    port: Annotated[int, Field(ge=1, le=65535)]
    address: str = "0.0.0.0"
    rcvbuf: Annotated[int, Field(ge=1)] | None = None
    read: bool = True
    """False: the socket never reads, so its queue fills (SOCKET_RCVBUFF)."""
    filter: str | None = None
    """'drop-all' or a tcpdump expression, attached with SO_ATTACH_FILTER."""


class CaptureSpec(Strict):
    """An AF_PACKET capture on a node's interface (all its interfaces when omitted)."""

    node: str
    interface: str | None = None
    filter: str | None = None


class Setup(Strict):
    """What a check puts in place before its traffic; all of it is undone afterwards."""

    listen: list[Listen] = []
    capture: list[CaptureSpec] = []
    iptables: dict[str, list[str]] = {}
    ebtables: dict[str, list[str]] = {}
    sysctls: dict[str, dict[str, int | str | bool]] = {}
    hooks_match: str | None = None
    """iptables match limiting the hook trace to the check's packets (derived from the traffic when omitted)."""


class Inject(Strict):
    """Raw frames written on an interface with AF_PACKET (they enter the peer's receive path)."""

    node: str
    interface: str | None = None
    packet: str
    count: Annotated[int, Field(ge=1)] = 1
    rate: Annotated[float, Field(gt=0)] | None = None
    cpu: Annotated[int, Field(ge=0)] | None = None
    """Send from this CPU (so RPS can steer the receive to another one's backlog)."""


class SendUdp(Strict):
    """Datagrams sent through the node's own socket (the send path: OUTPUT, routing, qdisc)."""

    node: str
    to: str
    payload: str = "labctl"
    size: Annotated[int, Field(ge=0, le=65000)] | None = None
    count: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _to(self) -> SendUdp:
        host, sep, port = self.to.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"'to' must be ADDRESS:PORT, got {self.to!r}")
        _address(host)
        return self


def _address(value: str) -> str:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (lab traffic goes to lab addresses only)") from None
    return value


Address = Annotated[str, AfterValidator(_address)]


class Ping(Strict):
    node: str
    to: Address
    count: Annotated[int, Field(ge=1, le=100)] = 1


class Traffic(Strict):
    """Exactly one way in per traffic step."""

    inject: Inject | None = None
    udp: SendUdp | None = None
    ping: Ping | None = None
    settle: Annotated[float, Field(ge=0, le=10)] = 0.1
    """Seconds to wait after sending for the kernel to finish with the packets."""

    @model_validator(mode="after")
    def _one(self) -> Traffic:
        given = [k for k in ("inject", "udp", "ping") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a traffic step has exactly one of 'inject', 'udp' or 'ping'")
        return self

    @property
    def node(self) -> str:
        step = self.inject or self.udp or self.ping
        assert step is not None
        return step.node


class DropExpect(Strict):
    reason: str
    at: str | None = None
    """Function named by the drop's location (e.g. __udp4_lib_rcv); may be the inlined caller."""
    count: Count = ">=1"
    anywhere: bool = False
    """Also count drops made in timer context of skbs that never reached a device
    (NEIGH_FAILED): no task of the lab ran them, so they are matched by reason and time only."""


class Expect(Strict):
    """What the kernel must show; every key present is checked, absent keys are not."""

    delivered: Count | None = None
    """Datagrams received by the check's listeners (all of them together)."""
    queued_bytes: Count | None = None
    """Bytes (skb memory) waiting unread in the listeners' receive queues after the traffic."""
    dropped: DropExpect | None = None
    drops: dict[str, Count] = {}
    """Attributed drops per reason name, e.g. {NO_SOCKET: 1, NETFILTER_DROP: 0}."""
    counters: dict[str, dict[str, Count]] = {}
    """Per node, deltas of /proc/net/snmp|netstat (Udp.NoPorts) and links (eth0.rx_packets)."""
    softnet_dropped: Count | None = None
    captured: dict[str, Count] = {}
    """Per capture ('node' or 'node:interface'), frames that matched its filter."""
    captured_direction: dict[str, Literal["in", "out"]] = {}
    stages: list[str] = []
    """Event keys (net:netif_rx, ...) that must appear, in this order, in the traffic's path."""
    events: dict[str, Count] = {}
    """Attributed events per key, e.g. {'net:napi_gro_receive_entry': '>=1', 'net:netif_rx@lo': 0}
    ('@dev' counts only events on that device)."""
    tap_after_qdisc: str | None = None
    """'node:iface' with a capture: frames captured going out + that interface's qdisc drops == frames sent."""
    rules: dict[str, dict[str, Count]] = {}
    """Per node, packet-counter deltas of rules, keyed 'table:chain:N' or 'table:chain:policy'."""
    ebtables: dict[str, dict[str, Count]] = {}
    send_error: str | None = None
    """errno name the sender must get (EPERM, ENETUNREACH); 'none' for a clean send."""
    fdb: dict[str, Annotated[list[str], Field(min_length=1)]] = {}
    """Per 'node:bridge', MACs (or 'node:iface' to mean that interface's MAC) the bridge must have learnt."""
    hooks: dict[str, Annotated[list[str], Field(min_length=1)]] = {}
    """Per node, netfilter steps that must appear in this order, as 'table:CHAIN' or 'bridge:table:CHAIN'."""
    conntrack: Count | None = None
    reachable: bool | None = None
    """Every ping of the check got its echo reply (True) or none did (False)."""
    received_from: Address | None = None
    """Source address the listener must see (NAT)."""


class Check(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    covers: list[str] = []
    description: str = ""
    setup: Setup = Setup()
    traffic: list[Traffic] = []
    expect: Expect = Expect()
    repeat: Annotated[int, Field(ge=1, le=100)] = 1


class LabFile(Topology):
    """A topology plus the checks that verify it."""

    checks: list[Check] = []

    def check(self) -> list[Problem]:
        return super().check() + _check_references(self)


def _check_references(lab: LabFile) -> list[Problem]:
    problems: list[Problem] = []

    def node_ok(path: KeyPath, node: str) -> bool:
        if node not in lab.nodes:
            problems.append(Problem(path, f"unknown node {node!r} (nodes: {', '.join(sorted(lab.nodes))})"))
            return False
        return True

    def iface_ok(path: KeyPath, node: str, ifname: str | None) -> None:
        if node_ok(path, node) and ifname is not None and ifname not in lab.interface_names(node):
            problems.append(Problem(path, f"node {node} has no interface {ifname!r}"))

    names: set[str] = set()
    for i, check in enumerate(lab.checks):
        base: KeyPath = ("checks", i)
        if check.name in names:
            problems.append(Problem((*base, "name"), f"another check is already called {check.name!r}"))
        names.add(check.name)
        for j, claim in enumerate(check.covers):
            if not CLAIM_RE.match(claim):
                problems.append(Problem((*base, "covers", j), f"{claim!r} is not a claim id like R7 or E3"))
        for j, listen in enumerate(check.setup.listen):
            node_ok((*base, "setup", "listen", j, "node"), listen.node)
        for j, cap in enumerate(check.setup.capture):
            iface_ok((*base, "setup", "capture", j), cap.node, cap.interface)
        for table in ("iptables", "ebtables", "sysctls"):
            for node in getattr(check.setup, table):
                node_ok((*base, "setup", table, node), node)
        for j, step in enumerate(check.traffic):
            sent = step.inject or step.udp or step.ping
            assert sent is not None
            iface_ok((*base, "traffic", j), sent.node, step.inject.interface if step.inject else None)
        captures = {c.node for c in check.setup.capture} | {f"{c.node}:{c.interface}" for c in check.setup.capture}
        capture_refs: list[tuple[KeyPath, str]] = [((*base, "expect", "captured", k), k) for k in check.expect.captured]
        capture_refs += [((*base, "expect", "captured_direction", k), k) for k in check.expect.captured_direction]
        if check.expect.tap_after_qdisc is not None:
            capture_refs.append(((*base, "expect", "tap_after_qdisc"), check.expect.tap_after_qdisc))
        for path, key in capture_refs:
            if key not in captures:
                problems.append(Problem(path, f"no capture {key!r} in this check's setup"))
        for key in check.expect.fdb:
            node, _, bridge = key.partition(":")
            if node_ok((*base, "expect", "fdb", key), node) and bridge not in lab.nodes[node].bridges:
                problems.append(Problem((*base, "expect", "fdb", key), f"node {node} has no bridge {bridge!r}"))
        for key in ("counters", "rules", "ebtables", "hooks"):
            for node in getattr(check.expect, key):
                node_ok((*base, "expect", key, node), node)
        if (check.expect.delivered is not None or check.expect.queued_bytes is not None) and not check.setup.listen:
            problems.append(Problem((*base, "expect", "delivered"), "'delivered' needs a listener in setup.listen"))
    return problems


def expectation_keys() -> list[str]:
    return list(Expect.model_fields)
