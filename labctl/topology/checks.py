"""The ``checks`` of a lab file: stage, traffic and what the kernel must show.

A check is data, like the topology: it names nodes and interfaces of the lab
and claim ids of PATHS.md, and states expectations.  Values that are counts
accept an exact integer or a bound (``">=1"``, ``"<=5"``, ``"10..200"``);
exact is the rule, bounds are for what is statistical (backlog overflow).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, TypeAdapter, create_model, field_validator, model_validator

from labctl.errors import KeyPath, Problem
from labctl.expect.base import KIND_MODULES, LabView, kind
from labctl.expect.bounds import Count, matches, parse_bound
from labctl.expect.values import Address, check_address
from labctl.topology.model import NAME_PATTERN, LabFile, Strict, Topology
from labctl.topology.nft import NftRuleset
from labctl.topology.steps import Exec, SendTcp, SetupExec, check_features, exec_expectations, exec_label

KERNEL_RANGE = r"^\s*(>=|<=|==|!=|>|<)?\s*\d+(\.\d+){0,2}\s*(,\s*(>=|<=|==|!=|>|<)?\s*\d+(\.\d+){0,2}\s*)*$"
"""A check's ``kernel:``: comma-separated comparisons that must all hold (``>=6.2``, ``>=5.15,<6.8``, ``6.1``);
judged against the running kernel by labctl.kernel.version."""

__all__ = ["Address", "Check", "Count", "Expect", "LabFile", "matches", "parse_bound"]

CLAIM_RE = re.compile(r"^[A-Z]\d+$")


class Listen(Strict):
    """A socket on a node: UDP to deliver to, fill up, or filter (``address: "::"`` for IPv6); TCP
    (``proto: tcp``) to accept connections or not."""

    node: str
    port: Annotated[int, Field(ge=1, le=65535)]
    address: Address = "0.0.0.0"
    proto: Literal["udp", "tcp"] = "udp"
    backlog: Annotated[int, Field(ge=0, le=4096)] = 16
    """tcp: listen()'s backlog, the accept queue's length."""
    accept: bool = True
    """tcp: False leaves completed handshakes waiting in the accept queue (it overflows past ``backlog``)."""
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
    ip6tables: dict[str, list[str]] = {}
    """Per node, ip6tables rules added for the check; the node's own ip6tables rules are restored after."""
    ebtables: dict[str, list[str]] = {}
    nftables: dict[str, NftRuleset] = {}
    """Per node, nft commands run on top of the node's ruleset for the check; the ruleset is restored after."""
    sysctls: dict[str, dict[str, int | str | bool]] = {}
    warm_neighbours: bool = True
    """Before the window, resolve the next hop of every udp step (one ping): the traffic's datagrams are then
    sent by the sender itself, not later from the softirq of an ARP reply. false to watch the resolution."""
    fdb_flush: list[Annotated[str, Field(pattern=r"^[^:]+:[^:]+$")]] = []
    """'node:bridge' whose learnt entries are forgotten before the traffic (a learning check starts clean)."""
    napi_threaded: list[Annotated[str, Field(pattern=r"^[^:@]+:[^:@]+(@\d+)?$")]] = []
    """'node:iface' whose NAPI runs in its own kernel thread for the check (/sys/class/net/IFACE/threaded),
    undone afterwards: with GRO on a veth, batching in the thread is what lets GRO merge."""
    features: dict[str, dict[str, bool]] = {}
    """'node:iface' -> ethtool features for the check (rx-gro-list, rx-udp-gro-forwarding, tx-udp-segmentation;
    gro and tso are rx-gro and tx-tcp-segmentation), put back to what they were afterwards."""
    exec: list[SetupExec] = []
    """Programs run in nodes before the traffic (each must end as said, exit 0 by default, or the check is an
    ERROR); each ``undo`` argv runs when the check is undone, in reverse order."""
    hooks_match: str | None = None
    """iptables match limiting the hook trace to the check's packets (derived from the traffic when omitted)."""

    _features = field_validator("features")(check_features)


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
    count: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    cpu: Annotated[int, Field(ge=0)] | None = None
    """Send from this CPU (RPS experiments)."""
    gso_size: Annotated[int, Field(ge=1, le=65507)] | None = None
    """UDP_SEGMENT: each send of ``size`` bytes leaves as ceil(size/gso_size) datagrams (UDP GSO)."""
    df: bool | None = None
    """true: IP_PMTUDISC_DO / IPV6_DONTFRAG (too big for the known path MTU is EMSGSIZE, a router answers
    frag-needed / too-big); false: IP_PMTUDISC_DONT / IPV6_DONTFRAG 0 (IPv4 leaves without DF, so routers
    fragment).  Absent: the kernel's default -- for IPv4 that is IP_PMTUDISC_WANT, which sets DF too."""

    @model_validator(mode="after")
    def _to(self) -> SendUdp:
        host, sep, port = self.to.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"'to' must be ADDRESS:PORT ([ADDRESS]:PORT for IPv6), got {self.to!r}")
        check_address(host)
        if ":" in host and not host.startswith("["):
            raise ValueError(f"an IPv6 destination is written [ADDRESS]:PORT, got {self.to!r}")
        if self.gso_size is not None:
            size = len(self.payload) if self.size is None else self.size
            if size > self.gso_size * UDP_MAX_SEGMENTS:
                raise ValueError(
                    f"size {size} with gso_size {self.gso_size} is more than {UDP_MAX_SEGMENTS} segments per send"
                )
        return self

    @property
    def host(self) -> str:
        """The destination address without brackets."""
        return self.to.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.to.rpartition(":")[2])


UDP_MAX_SEGMENTS = 64
"""UDP_MAX_SEGMENTS of <linux/udp.h> on older kernels (128 since 6.x): the smaller bound is portable."""


class Ping(Strict):
    """iputils ping from a node; IPv4 or IPv6 by the address."""

    node: str
    to: Address
    count: Annotated[int, Field(ge=1, le=100)] = 1
    size: Annotated[int, Field(ge=0, le=65507)] | None = None
    """ICMP payload bytes (ping -s)."""
    df: bool = False
    """Don't fragment (ping -M do): too big for the path is an error or an ICMP frag-needed / too-big."""
    ttl: Annotated[int, Field(ge=1, le=255)] | None = None
    """IPv4 TTL / IPv6 hop limit of the echo requests (ping -t)."""
    broadcast: bool = False
    """Allow a broadcast destination (ping -b)."""
    interval: Annotated[float, Field(ge=0.002, le=10)] = 0.01
    """Seconds between echo requests (ping -i)."""

    def argv(self) -> list[str]:
        """The ping command line (-W 1: a lost reply costs a second, not ten).

        Not ``-q``: quiet ping also hides its "local error" lines, and an echo request the node's own
        stack refused (EMSGSIZE over a learnt PMTU) must not pass for one that was sent and lost.
        """
        argv = ["ping", "-n", "-c", str(self.count), "-i", str(self.interval), "-W", "1"]
        if self.size is not None:
            argv += ["-s", str(self.size)]
        if self.df:
            argv += ["-M", "do"]
        if self.ttl is not None:
            argv += ["-t", str(self.ttl)]
        if self.broadcast:
            argv.append("-b")
        return [*argv, self.to]


class Traffic(Strict):
    """Exactly one way in per traffic step."""

    inject: Inject | None = None
    udp: SendUdp | None = None
    ping: Ping | None = None
    tcp: SendTcp | None = None
    exec: Exec | None = None
    settle: Annotated[float, Field(ge=0, le=10)] | None = None
    """Seconds to wait after the step, fixed: for a timer nothing shows running (ARP probes, a netem delay).
    Left out, the wait ends once the lab is quiet (labctl/evidence/window.py ``Window.settle``)."""

    @model_validator(mode="after")
    def _one(self) -> Traffic:
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a traffic step has exactly one of {', '.join(repr(k) for k in STEP_KINDS)}")
        return self

    @property
    def step(self) -> Inject | SendUdp | Ping | SendTcp | Exec:
        found = self.inject or self.udp or self.ping or self.tcp or self.exec
        assert found is not None
        return found

    @property
    def node(self) -> str:
        return self.step.node


STEP_KINDS = ("inject", "udp", "ping", "tcp", "exec")


_KIND_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def _expect_value(key: str) -> Any:
    """The type of ``expect``'s key ``key``: its kind's schema, compiled the first time a check uses the key.

    A ValidationError of the kind's schema keeps its locations under the key (``expect.drops.x``), as when
    the schema was the field's own type; None (the key given empty) is None, as for ``schema | None``.
    """

    def validate(value: Any) -> Any:
        if value is None:
            return None
        if key not in _KIND_ADAPTERS:
            _KIND_ADAPTERS[key] = TypeAdapter(kind(key).schema)
        return _KIND_ADAPTERS[key].validate_python(value)

    return Annotated[Any, PlainValidator(validate)]


def _expect_model() -> type[Strict]:
    """The ``expect`` mapping, one optional key per expectation kind (labctl.expect.kinds), none imported yet."""
    fields: dict[str, Any] = {key: (_expect_value(key), None) for key in KIND_MODULES}
    model = create_model("Expect", __base__=Strict, __doc__="What the kernel must show; every key present is judged.",
                         **fields)
    return model


Expect = _expect_model()


class Check(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    covers: list[str] = []
    requires: list[Annotated[str, Field(pattern=r"^CONFIG_\w+(\|CONFIG_\w+)*$")]] = []
    """Kernel options the check needs ('CONFIG_A|CONFIG_B' for either): on a kernel without them it is not run
    and the claims it covers are reported as not provable here, never as proven by something else."""
    kernel: Annotated[str | None, Field(pattern=KERNEL_RANGE)] = None
    """Kernel versions the check holds for (">=6.2", ">=5.15,<6.8"): on another kernel it is not run, and a
    verdict that differs across kernels is reported as explained by the lab, not as a failure."""
    description: str = ""
    setup: Setup = Setup()
    traffic: list[Traffic] = []
    expect: Expect = Expect()  # type: ignore[valid-type]
    repeat: Annotated[int, Field(ge=1, le=100)] = 1
    alone: bool = False
    """Run while no other lab runs (``labctl run -j``, ``pytest -n``): the verdict depends on timing another
    lab's load would change (a rate-limited qdisc's drop count).  Host-wide sysctls and host-wide evidence
    (softnet) make a lab run alone without saying so."""

    @model_validator(mode="before")
    @classmethod
    def _exec_expectations(cls, data: Any) -> Any:
        """An exec traffic step's exit/stdout/stderr are the ``exec`` expectation of its step (one judge)."""
        return exec_expectations(data)


@functools.cache
def checks_adapter() -> TypeAdapter[list[Check]]:
    """The validator of a lab file's ``checks`` list (LabFile's field), built once per process.

    ``Check`` is built first as a model of its own, so its instances serialize (``model_dump``, the lab's
    digest) with the validator and serializer built here; the list around it reuses that core schema.
    """
    Check.model_rebuild()
    return TypeAdapter(list[Check])


def check_references(lab: LabFile) -> list[Problem]:
    """The checks' names, nodes, interfaces, addresses and expectations against the lab (LabFile.check)."""
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
            if node_ok((*base, "setup", "listen", j, "node"), listen.node):
                problem = _listen_address_problem(lab, listen)
                if problem:
                    problems.append(Problem((*base, "setup", "listen", j, "address"), problem))
        for j, cap in enumerate(check.setup.capture):
            iface_ok((*base, "setup", "capture", j), cap.node, cap.interface)
        for table in ("iptables", "ip6tables", "ebtables", "nftables", "sysctls"):
            for node in getattr(check.setup, table):
                node_ok((*base, "setup", table, node), node)
        for j, step in enumerate(check.traffic):
            iface_ok((*base, "traffic", j), step.node, step.inject.interface if step.inject else None)
            if step.node in lab.nodes and (step.udp or step.ping or step.tcp):
                step_key = "udp" if step.udp else "tcp" if step.tcp else "ping"
                to = step.udp.host if step.udp else step.tcp.host if step.tcp else step.ping.to if step.ping else ""
                problem = _family_problem(lab, step.node, to)
                if problem:
                    problems.append(Problem((*base, "traffic", j, step_key, "to"), problem))
        for j, run in enumerate(check.setup.exec):
            node_ok((*base, "setup", "exec", j, "node"), run.node)
        for ref in check.setup.features:
            node, _, ifname = ref.partition(":")
            iface_ok((*base, "setup", "features", ref), node, ifname)
        for j, ref in enumerate(check.setup.fdb_flush):
            node, _, bridge = ref.partition(":")
            if node_ok((*base, "setup", "fdb_flush", j), node) and bridge not in lab.nodes[node].bridges:
                problems.append(Problem((*base, "setup", "fdb_flush", j), f"node {node} has no bridge {bridge!r}"))
        for j, ref in enumerate(check.setup.napi_threaded):
            node, _, ifname = ref.partition("@")[0].partition(":")
            iface_ok((*base, "setup", "napi_threaded", j), node, ifname)
        captures = {f"{c.node}:{c.interface}" if c.interface else c.node for c in check.setup.capture}
        view = LabView(
            nodes={n: frozenset(lab.interface_names(n)) for n in lab.nodes},
            bridges={n: frozenset(spec.bridges) for n, spec in lab.nodes.items()},
            captures=frozenset(captures),
            listeners=len(check.setup.listen),
            sockets={f"{spec.node}:{spec.port}": spec.proto for spec in check.setup.listen},
            exec_steps=frozenset(exec_label(j) for j, step in enumerate(check.traffic) if step.exec)
            | {exec_label(j, "setup") for j in range(len(check.setup.exec))},
            step_kinds=frozenset(k for step in check.traffic for k in STEP_KINDS if getattr(step, k) is not None),
        )
        expect = check.expect
        for key in KIND_MODULES:
            value = getattr(expect, key)
            if value is None:
                continue
            for sub, message in kind(key).references(value, view):
                problems.append(Problem((*base, "expect", key, *sub), message))
    return problems


def node_families(lab: Topology, node: str) -> set[int]:
    """IP versions a node can send with: those of its addresses and of its routes."""
    spec = lab.nodes[node]
    versions: set[int] = {iface.version for cfg in spec.interfaces.values() for iface in cfg.addresses}
    versions |= {route.network.version for route in spec.routes}
    return versions


def _family_problem(lab: Topology, node: str, to: str) -> str | None:
    """Why ``node`` cannot send to ``to`` at all (wrong IP version for what it has), or None."""
    address = ipaddress.ip_address(to.strip("[]"))
    spec = lab.nodes[node]
    if address.version == 6 and not spec.ipv6:
        return f"{to} is an IPv6 address but node {node} has IPv6 off (ipv6: true)"
    if address.is_loopback:
        return None
    if address.version not in node_families(lab, node):
        return f"{to} is IPv{address.version} but node {node} has no IPv{address.version} address or route"
    return None


def _listen_address_problem(lab: Topology, listen: Listen) -> str | None:
    address = ipaddress.ip_address(listen.address.strip("[]"))
    if address.version == 6 and not lab.nodes[listen.node].ipv6:
        return f"{listen.address} is an IPv6 address but node {listen.node} has IPv6 off (ipv6: true)"
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        return None  # a multicast group can be bound to receive it
    ifaces = [iface for cfg in lab.nodes[listen.node].interfaces.values() for iface in cfg.addresses]
    own = {iface.ip for iface in ifaces}
    own |= {iface.network.broadcast_address for iface in ifaces if iface.version == 4}
    if address not in own:
        return f"node {listen.node} has no address {listen.address} to bind"
    return None


def expectation_keys() -> list[str]:
    return list(KIND_MODULES)
