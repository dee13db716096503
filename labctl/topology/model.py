"""Pydantic models of a lab topology, and the cross-reference checks.

The shape follows containerlab (``topology: nodes / links: endpoints``) so a
newcomer can read a lab without docs.  Models only describe; building is the
lab layer's job, and nothing here imports the kernel layer.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

from labctl.errors import KeyPath, Problem
from labctl.names import check_ifname, check_lab_name, check_node_name
from labctl.topology.kinds import BridgeExtras, KindChecker, VirtualFields
from labctl.topology.nft import NftRuleset
from labctl.topology.tc import TcConfig
from labctl.topology.tc import from_legacy as tc_from_legacy

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
"""Kept for callers that match names themselves; the checks are labctl.names' (one function per kind)."""
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
RPS_MASK_RE = re.compile(r"^[0-9a-fA-F]+(,[0-9a-fA-F]+)*$")

LabName = Annotated[str, AfterValidator(check_lab_name)]
NodeName = Annotated[str, AfterValidator(check_node_name)]


def _ip_interface(value: Any) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{value!r} is not an address with a prefix length, like 10.0.0.1/24")
    try:
        return ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid address with prefix: {exc}") from None


def _ip_address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


IPInterface = Annotated[ipaddress.IPv4Interface | ipaddress.IPv6Interface, PlainValidator(_ip_interface)]
IPAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, PlainValidator(_ip_address)]


def _sysctl_value(value: Any) -> int | str | bool:
    if isinstance(value, bool | int | str):
        return value
    kind = "a decimal number" if isinstance(value, float) else f"a {type(value).__name__}"
    raise ValueError(f"{value!r} is {kind}; a sysctl takes an integer, a boolean or a word")


SysctlValue = Annotated[int | str | bool, PlainValidator(_sysctl_value)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently do nothing.

    ``defer_build``: a model's validator is built when it is first used, not when its class is defined.
    A lab file is validated as one ``LabFile`` (one validator for the whole tree) instead of each of the
    ~70 classes compiling its own at import; a command that validates no file builds none.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class QdiscConfig(Strict):
    """A root qdisc small enough to overflow on purpose (notes §2: qdisc drops)."""

    kind: Literal["tbf", "pfifo"]
    limit: Annotated[int, Field(ge=1)]
    """Bytes for tbf, packets for pfifo."""
    rate: str = "1mbit"
    """tbf only: token rate, e.g. 1mbit or 500kbit."""
    burst: Annotated[int, Field(ge=1)] = 1600
    """tbf only: bucket size in bytes."""

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        if not re.match(r"^\d+(\.\d+)?([kmg]?bit|[kmg]?bps)$", value):
            raise ValueError(f"{value!r} is not a rate such as 1mbit or 500kbit")
        if float(re.match(r"^[\d.]+", value).group()) == 0:  # type: ignore[union-attr]
            raise ValueError("a tbf rate must be above zero")
        return value


class InterfaceConfig(VirtualFields, Strict):
    """Settings of one interface of a node: a veth end, a tap, a bridge, ``lo``, or one of its own ``kind``."""

    addresses: list[IPInterface] = []
    mac: str | None = None
    mtu: Annotated[int, Field(ge=68, le=65535)] | None = None
    promisc: bool = False
    gro: bool | None = None
    """None leaves the driver default; True/False switches GRO (ethtool -K gro)."""
    features: dict[str, bool] = {}
    """Other ethtool features by name, e.g. {rx-gro-list: true, tx-tcp-segmentation: false}."""
    rps_cpus: str | None = None
    """Hex CPU mask written to queues/rx-0/rps_cpus, e.g. "2" for CPU 1."""
    txqueuelen: Annotated[int, Field(ge=0)] | None = None
    qdisc: QdiscConfig | None = None
    """The older form of ``tc: {qdisc: ...}`` (tbf/pfifo only)."""
    tc: TcConfig | None = None
    """Traffic control in tc's units: root qdisc (htb classes), ingress/clsact, filters (labctl.topology.tc)."""
    up: bool = True

    @model_validator(mode="after")
    def _one_qdisc(self) -> InterfaceConfig:
        if self.qdisc is not None and self.tc is not None:
            raise ValueError("qdisc and tc both set the interface's qdisc: put it under tc: {qdisc: ...}")
        return self

    @property
    def traffic_control(self) -> TcConfig | None:
        """``tc``, or the older ``qdisc`` key in the same shape."""
        if self.qdisc is not None:
            q = self.qdisc
            return tc_from_legacy(q.kind, q.limit, q.rate, q.burst)
        return self.tc

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None:
            if not MAC_RE.match(value):
                raise ValueError(f"{value!r} is not a MAC address like 02:00:00:00:00:01")
            if int(value[:2], 16) & 1:
                raise ValueError(f"{value} is a multicast MAC; an interface needs a unicast one")
            value = value.lower()
        return value

    @field_validator("rps_cpus")
    @classmethod
    def _rps(cls, value: str | None) -> str | None:
        if value is not None and not RPS_MASK_RE.match(value):
            raise ValueError(f"{value!r} is not a hex CPU mask such as '2' or 'f'")
        return value


class BridgeConfig(BridgeExtras, Strict):
    """A Linux bridge inside a node; its address goes under the node's ``interfaces``.

    VLAN filtering, per-port flags and static fdb entries come from BridgeExtras (topology/kinds.py).
    """

    ports: list[str] = []
    stp: bool = False
    ageing_time: Annotated[float, Field(ge=0)] = 300.0
    """Seconds a learnt MAC stays in the fdb."""
    forward_delay: Annotated[float, Field(ge=0)] = 0.0
    """Seconds in listening/learning (matters only with STP on)."""

    @field_validator("ports")
    @classmethod
    def _ports(cls, ports: list[str]) -> list[str]:
        for port in ports:
            check_ifname(port)
        return ports


class Route(Strict):
    dst: str = "default"
    via: IPAddress | None = None
    dev: str | None = None

    @field_validator("dst")
    @classmethod
    def _dst(cls, value: str) -> str:
        if value != "default":
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not 'default' or a network like 10.0.0.0/24: {exc}") from None
        return value

    @model_validator(mode="after")
    def _needs_next_hop(self) -> Route:
        if self.via is None and self.dev is None:
            raise ValueError("a route needs 'via' (a gateway) or 'dev' (an interface)")
        return self

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if self.dst == "default":
            return ipaddress.ip_network("::/0" if self.via and self.via.version == 6 else "0.0.0.0/0")
        return ipaddress.ip_network(self.dst)


class Node(Strict):
    """A network namespace; kind ``vm`` is one whose NICs are fed through taps by a relay."""

    kind: Literal["netns", "vm"] = "netns"
    sysctls: dict[str, SysctlValue] = {}
    """Per-namespace sysctls, written inside the node (e.g. net.ipv4.ip_forward: 1)."""
    ipv6: bool = False
    """IPv6 is off unless asked for: router solicitations and DAD add noise to traces."""
    dad: bool = True
    """IPv6 duplicate address detection (accept_dad).  With it, ``up`` waits until every address has left the
    tentative state (about a second); ``false`` sets accept_dad=0 before any interface exists, so addresses
    are usable at once and no DAD probes appear in the window."""
    interfaces: dict[str, InterfaceConfig] = {}
    bridges: dict[str, BridgeConfig] = {}
    routes: list[Route] = []
    iptables: list[str] = []
    """Rules in iptables syntax (-t nat -A POSTROUTING -o eth1 -j MASQUERADE), applied in order."""
    ip6tables: list[str] = []
    """IPv6 rules in ip6tables syntax (-A INPUT -p icmpv6 --icmpv6-type echo-request -j DROP), applied in order."""
    ebtables: list[str] = []
    """Rules in ebtables syntax (-t broute -A BROUTING -p ipv4 -j DROP), applied in order."""
    nftables: NftRuleset | None = None
    """The node's nf_tables ruleset in nft syntax (a text, or a list of commands), loaded in one transaction."""

    @field_validator("interfaces", "bridges")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            check_ifname(name)
        return value


class Endpoint(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)
    node: str
    interface: str

    def __str__(self) -> str:
        return f"{self.node}:{self.interface}"


def _endpoint_text(text: str) -> str:
    node, sep, ifname = text.partition(":")
    if not sep or not node or not ifname:
        raise ValueError(f"endpoint {text!r} must look like 'node:interface'")
    check_ifname(ifname)
    return text


EndpointText = Annotated[str, AfterValidator(_endpoint_text)]


class Link(Strict):
    """A cable between two interfaces: a veth pair, or a tap pair with a relay for a VM."""

    endpoints: tuple[EndpointText, EndpointText]
    mtu: Annotated[int, Field(ge=68, le=65535)] | None = None

    @property
    def ends(self) -> tuple[Endpoint, Endpoint]:
        a, b = (Endpoint(node=t.partition(":")[0], interface=t.partition(":")[2]) for t in self.endpoints)
        return a, b


class TopologyBody(Strict):
    nodes: dict[NodeName, Node]
    links: list[Link] = []


class Topology(Strict):
    """A whole lab file's topology part (verification checks live beside it)."""

    name: LabName
    description: str = ""
    sysctls: dict[str, SysctlValue] = {}
    """Host-wide sysctls (e.g. net.core.netdev_max_backlog): recorded, set, restored on down."""
    topology: TopologyBody

    @property
    def nodes(self) -> dict[str, Node]:
        return self.topology.nodes

    @property
    def links(self) -> list[Link]:
        return self.topology.links

    def link_interfaces(self, node: str) -> dict[str, tuple[int, Endpoint]]:
        """Interfaces of ``node`` made by links: name -> (link index, the far end)."""
        return dict(self._link_index.get(node, {}))

    @cached_property
    def _link_index(self) -> dict[str, dict[str, tuple[int, Endpoint]]]:
        """node -> its link interfaces, built once: asking per node must not walk every link (O(N^2))."""
        index: dict[str, dict[str, tuple[int, Endpoint]]] = {}
        for number, link in enumerate(self.links):
            a, b = link.ends
            index.setdefault(a.node, {})[a.interface] = (number, b)
            index.setdefault(b.node, {})[b.interface] = (number, a)
        return index

    def is_tap_link(self, link: Link) -> bool:
        """A link that touches a VM is realised as a tap on each side, joined by the VM's relay."""
        return any(self.nodes[end.node].kind == "vm" for end in link.ends if end.node in self.nodes)

    def interface_names(self, node: str) -> set[str]:
        spec = self.nodes[node]
        virtual = {name for name, cfg in spec.interfaces.items() if cfg.kind is not None}
        return set(self.link_interfaces(node)) | set(spec.bridges) | {"lo"} | virtual

    def check(self) -> list[Problem]:
        """Cross-reference checks that a single model cannot do on its own."""
        return _Checker(self).run()


def _validate_checks(value: Any) -> list[Any]:
    """A lab file's ``checks``, validated by the check model (labctl.topology.checks), imported on first use.

    The check model is most of a lab file's schema: ~50 classes and every expectation kind's module.  A
    file without checks (and ``trace``/``status`` of such a lab) never imports or builds it.  The errors are
    pydantic's own: a ValidationError raised here keeps its locations under ``checks`` (``checks.0.name``).
    """
    from labctl.topology.checks import checks_adapter

    return checks_adapter().validate_python(value)


if TYPE_CHECKING:
    from labctl.topology.checks import Check

    CheckList = list[Check]
else:
    CheckList = Annotated[list[Any], PlainValidator(_validate_checks)]


class LabFile(Topology):
    """A topology plus the checks that verify it (their model lives in labctl.topology.checks)."""

    checks: CheckList = []

    def check(self) -> list[Problem]:
        problems = super().check()
        if self.checks:
            from labctl.topology.checks import check_references

            problems += check_references(self)
        return problems


class _Checker:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.problems: list[Problem] = []

    def add(self, path: KeyPath, message: str) -> None:
        self.problems.append(Problem(path=path, message=message))

    def run(self) -> list[Problem]:
        self.check_links()
        if not self.problems:  # the rest assumes links name real nodes
            for name, node in self.topo.nodes.items():
                self.check_node(name, node)
            self.check_duplicate_addresses()
        return self.problems

    def check_links(self) -> None:
        seen: dict[str, int] = {}
        for index, link in enumerate(self.topo.links):
            for side, end in enumerate(link.ends):
                path: KeyPath = ("topology", "links", index, "endpoints", side)
                if end.node not in self.topo.nodes:
                    known = ", ".join(sorted(self.topo.nodes))
                    self.add(path, f"unknown node {end.node!r} (nodes: {known})")
                    continue
                key = str(end)
                if key in seen:
                    self.add(path, f"{key} is already used by links[{seen[key]}]")
                seen[key] = index
                if end.interface == "lo":
                    self.add(path, "lo is the node's loopback; a link needs an interface of its own")
                if end.interface in self.topo.nodes[end.node].bridges:
                    self.add(path, f"{key} is a bridge of that node; a link needs its own interface")
            a, b = link.ends
            if a == b:
                self.add(("topology", "links", index, "endpoints"), "a link cannot join an interface to itself")

    def check_node(self, name: str, node: Node) -> None:
        base: KeyPath = ("topology", "nodes", name)
        own = self.topo.interface_names(name)
        linked = self.topo.link_interfaces(name)
        for ifname in node.interfaces:
            if ifname not in own:
                self.add(
                    (*base, "interfaces", ifname),
                    f"node {name} has no interface {ifname!r} (it has: {', '.join(sorted(own))});"
                    " interfaces come from links and bridges",
                )
        port_of: dict[str, str] = {}
        for bridge, config in node.bridges.items():
            for index, port in enumerate(config.ports):
                path = (*base, "bridges", bridge, "ports", index)
                if port not in linked and not _is_virtual(node, port):
                    self.add(path, f"{port!r} is not an interface of node {name} made by a link")
                elif port in port_of:
                    self.add(path, f"{port!r} is already a port of bridge {port_of[port]}")
                port_of[port] = bridge
        if "lo" in node.bridges:
            self.add((*base, "bridges", "lo"), "lo is the node's loopback; a bridge needs a name of its own")
        if node.kind == "vm" and node.bridges:
            self.add((*base, "bridges"), "a vm node has only NICs; put the bridge in the host node")
        for index, route in enumerate(node.routes):
            self.check_route(name, node, index, route, own)
        for path, message in KindChecker(self.topo, name).run():
            self.add(path, message)
        for ifname, cfg in node.interfaces.items():
            for index, iface in enumerate(cfg.addresses):
                if iface.version == 6 and not node.ipv6:
                    self.add(
                        (*base, "interfaces", ifname, "addresses", index),
                        f"{iface} is an IPv6 address but node {name} has IPv6 off: set ipv6: true",
                    )
        if not node.dad and not node.ipv6:
            self.add((*base, "dad"), f"dad: false is an IPv6 setting but node {name} has IPv6 off")
        if "lo" in node.interfaces and node.interfaces["lo"].up is False:
            self.add((*base, "interfaces", "lo", "up"), "lo is always up in a lab node")

    def check_route(self, name: str, node: Node, index: int, route: Route, own: set[str]) -> None:
        path: KeyPath = ("topology", "nodes", name, "routes", index)
        if route.dev is not None and route.dev not in own:
            self.add((*path, "dev"), f"node {name} has no interface {route.dev!r}")
        if route.via is None:
            return
        if route.dst != "default" and ipaddress.ip_network(route.dst).version != route.via.version:
            self.add((*path, "via"), f"gateway {route.via} and destination {route.dst} are of different IP versions")
        connected = [
            iface.network
            for ifname, cfg in node.interfaces.items()
            if route.dev in (None, ifname)
            for iface in cfg.addresses
        ]
        if not any(route.via in net for net in connected):
            self.add(
                (*path, "via"),
                f"gateway {route.via} is not in a subnet of node {name}'s addresses"
                f" ({', '.join(str(n) for n in connected) or 'none'})",
            )

    def check_duplicate_addresses(self) -> None:
        owners: dict[str, str] = {}
        for name, node in self.topo.nodes.items():
            for ifname, cfg in node.interfaces.items():
                for index, iface in enumerate(cfg.addresses):
                    ip = str(iface.ip)
                    here = f"{name}:{ifname}"
                    path: KeyPath = ("topology", "nodes", name, "interfaces", ifname, "addresses", index)
                    if ip in owners:
                        self.add(path, f"address {ip} is already used by {owners[ip]}")
                    owners[ip] = here


def _is_virtual(node: Node, ifname: str) -> bool:
    """An interface the node makes itself (a ``kind``): it may be a bridge port, like a vxlan."""
    cfg = node.interfaces.get(ifname)
    return cfg is not None and cfg.kind is not None
