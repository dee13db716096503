"""Interface kinds beyond veth and tap, and the bridge's VLAN, port and fdb settings.

A node's ``interfaces:`` entry with a ``kind`` is a virtual interface made
inside that node (never from a link)::

    interfaces:
      mv0:   {kind: macvlan, parent: eth0, mode: bridge, addresses: [10.0.0.5/24]}
      eth0.10: {kind: vlan}                  # parent eth0, id 10, read from the name
      vx0:   {kind: vxlan, vni: 42, remote: 10.0.0.2, local: 10.0.0.1, dev: eth0}
      bond0: {kind: bond, mode: active-backup, members: [eth1, eth2]}

The shape follows ``ip link add ... type KIND`` so an iproute2, containerlab
or netlab user reads it without docs.  Which keys a kind takes, which kernel
option it needs and the cross checks (parents exist, a member in one bond
only, a vxlan has an underlay) live here; the model knows no kernel, so the
options are only *names* that the lab layer compares with the running one.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from labctl.errors import KeyPath
from labctl.names import FALLBACK_DEVICES, check_ifname

if TYPE_CHECKING:
    from labctl.topology.model import BridgeConfig, InterfaceConfig, Topology


def _vlan_id(value: int) -> int:
    if not 1 <= value <= 4094:
        raise ValueError(f"VLAN id {value} is outside 1-4094 (0 and 4095 are reserved by 802.1Q)")
    return value


VlanId = Annotated[int, AfterValidator(_vlan_id)]

VirtualKind = Literal["vlan", "macvlan", "ipvlan", "vxlan", "dummy", "bond", "vrf", "gre", "ipip"]

KIND_OPTIONS: dict[str, str] = {
    "vlan": "CONFIG_VLAN_8021Q",
    "macvlan": "CONFIG_MACVLAN",
    "ipvlan": "CONFIG_IPVLAN",
    "vxlan": "CONFIG_VXLAN",
    "dummy": "CONFIG_DUMMY",
    "bond": "CONFIG_BONDING",
    "vrf": "CONFIG_NET_VRF",
    "gre": "CONFIG_NET_IPGRE",
    "ipip": "CONFIG_NET_IPIP",
}
"""The kernel option each kind's driver is built by (rtnetlink answers EOPNOTSUPP without it)."""
BRIDGE_VLAN_OPTION = "CONFIG_BRIDGE_VLAN_FILTERING"
BRIDGE_NETFILTER_OPTION = "CONFIG_BRIDGE_NETFILTER"
BRIDGE_SNOOPING_OPTION = "CONFIG_BRIDGE_IGMP_SNOOPING"

KIND_KEYS: dict[str, frozenset[str]] = {
    "vlan": frozenset({"parent", "id"}),
    "macvlan": frozenset({"parent", "mode"}),
    "ipvlan": frozenset({"parent", "mode"}),
    "vxlan": frozenset({"vni", "local", "remote", "group", "port", "dev", "learning"}),
    "dummy": frozenset(),
    "bond": frozenset({"mode", "members"}),
    "vrf": frozenset({"table", "members"}),
    "gre": frozenset({"local", "remote", "ttl"}),
    "ipip": frozenset({"local", "remote", "ttl"}),
}
"""Keys each kind takes besides the ones every interface has (addresses, mac, mtu, up ...)."""
ALL_KIND_KEYS = frozenset().union(*KIND_KEYS.values())
MODES: dict[str, tuple[str, ...]] = {
    "macvlan": ("bridge", "private", "vepa", "passthru", "source"),
    "ipvlan": ("l2", "l3", "l3s"),
    "bond": (
        "balance-rr",
        "active-backup",
        "balance-xor",
        "broadcast",
        "802.3ad",
        "balance-tlb",
        "balance-alb",
    ),
}
DEFAULT_MODE = {"macvlan": "bridge", "ipvlan": "l3", "bond": "balance-rr"}
MASTER_KINDS = ("bond", "vrf")
"""Kinds whose ``members`` are enslaved to them (made before the links, so a veth is born in them)."""
_VLAN_NAME = re.compile(r"^(?P<parent>.+)\.(?P<id>\d+)$")


class VirtualFields(BaseModel):
    """The kind-specific keys of a node's interface entry; which apply depends on ``kind``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    kind: VirtualKind | None = None
    """None: the interface comes from a link (veth or tap), a bridge, or is ``lo``."""
    parent: str | None = None
    """vlan, macvlan, ipvlan: the interface it sits on."""
    id: VlanId | None = None
    """vlan: the 802.1Q id (1-4094)."""
    mode: str | None = None
    """macvlan (bridge, private, vepa, passthru, source), ipvlan (l2, l3, l3s), bond (balance-rr, active-backup...)."""
    vni: Annotated[int, Field(ge=0, le=16777215)] | None = None
    local: str | None = None
    remote: str | None = None
    group: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """vxlan: UDP destination port (4789, the IANA one, unless set)."""
    dev: str | None = None
    """vxlan: the underlay interface."""
    learning: bool | None = None
    """vxlan: learn remote MACs from received frames (the kernel's default: on)."""
    members: list[str] = []
    """bond, vrf: interfaces enslaved to it."""
    table: Annotated[int, Field(ge=1, le=4294967294)] | None = None
    """vrf: its routing table."""
    ttl: Annotated[int, Field(ge=0, le=255)] | None = None

    @field_validator("parent")
    @classmethod
    def _parent(cls, value: str | None) -> str | None:
        """``eth0``, or ``node:eth0`` for a macvlan/ipvlan whose parent is in another node (a container's)."""
        if value is None:
            return None
        node, sep, ifname = value.rpartition(":")
        if sep and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", node):
            raise ValueError(f"{value!r} is not an interface (eth0) or another node's interface (host:eth0)")
        check_ifname(ifname)
        return value

    @field_validator("dev")
    @classmethod
    def _ifname(cls, value: str | None) -> str | None:
        return check_ifname(value) if value is not None else None

    @field_validator("members")
    @classmethod
    def _members(cls, value: list[str]) -> list[str]:
        for name in value:
            check_ifname(name)
        return value

    @field_validator("local", "remote", "group")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
        return value

    def vlan_parent_and_id(self, name: str) -> tuple[str | None, int | None]:
        """A vlan's parent and id: as given, else read from an ``eth0.10``-style name."""
        match = _VLAN_NAME.match(name)
        parent = self.parent or (match.group("parent") if match else None)
        vid = self.id if self.id is not None else (int(match.group("id")) if match else None)
        return parent, vid

    def underlay(self) -> str | None:
        """The interface of the same node a virtual one depends on (parent or vxlan dev), made first."""
        if self.kind == "vxlan":
            return self.dev
        return None if self.parent_node() else self.parent

    def parent_node(self) -> str | None:
        """The other node whose interface is the parent (``parent: host:eth0``), or None."""
        return self.parent.rpartition(":")[0] or None if self.parent else None

    def parent_ifname(self) -> str | None:
        return self.parent.rpartition(":")[2] if self.parent else None


class PortSettings(BaseModel):
    """One bridge port's flags and VLANs (``bridge link set`` / ``bridge vlan add``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    learning: bool = True
    flood: bool = True
    """Unknown-unicast flooding out of this port."""
    mcast_flood: bool = True
    bcast_flood: bool = True
    isolated: bool = False
    """Isolated ports talk only to non-isolated ones."""
    hairpin: bool = False
    """Send frames back out of the port they came in on."""
    neigh_suppress: bool = False
    pvid: VlanId | None = None
    """VLAN given to untagged frames coming in (needs the bridge's vlan_filtering)."""
    vids: list[VlanId] = []
    """VLANs allowed on the port besides the pvid."""
    untagged: bool | list[VlanId] = False
    """True: the pvid leaves untagged; a list: those VLANs leave untagged."""

    def vlans(self) -> dict[int, tuple[bool, bool]]:
        """vid -> (pvid, untagged), what the port's VLAN table must hold."""
        wanted: dict[int, tuple[bool, bool]] = {}
        untagged = set(self.untagged) if isinstance(self.untagged, list) else set()
        for vid in self.vids:
            wanted[vid] = (False, vid in untagged)
        if self.pvid is not None:
            wanted[self.pvid] = (True, self.untagged is True or self.pvid in untagged)
        return wanted

    def uses_vlans(self) -> bool:
        return self.pvid is not None or bool(self.vids) or self.untagged not in (False, [])


PORT_FLAGS = ("learning", "flood", "mcast_flood", "bcast_flood", "isolated", "hairpin", "neigh_suppress")


class FdbEntry(BaseModel):
    """A static fdb entry (``bridge fdb add MAC dev PORT master static [sticky]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    mac: str
    port: str
    sticky: bool = False
    """A sticky entry never moves to another port, even when the MAC shows up there."""
    vlan: VlanId | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        if not re.match(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$", value):
            raise ValueError(f"{value!r} is not a MAC address like 02:00:00:00:00:01")
        if int(value[:2], 16) & 1:
            raise ValueError(f"{value} is a multicast MAC; a static fdb entry takes a unicast one")
        return value.lower()


class BridgeExtras(BaseModel):
    """Bridge-wide settings beyond STP and timers (``ip link set BR type bridge ...``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    vlan_filtering: bool = False
    mcast_snooping: bool = True
    nf_call_iptables: bool = False
    """Per-bridge br_netfilter switch: bridged IPv4 goes through iptables."""
    nf_call_ip6tables: bool = False
    nf_call_arptables: bool = False
    port_settings: dict[str, PortSettings] = {}
    """Per-port flags and VLANs, by port name (each must be in ``ports``)."""
    fdb: list[FdbEntry] = []


def virtual_interfaces(interfaces: dict[str, InterfaceConfig]) -> dict[str, InterfaceConfig]:
    """The entries of a node's ``interfaces`` that make an interface of their own."""
    return {name: cfg for name, cfg in interfaces.items() if cfg.kind is not None}


def creation_order(interfaces: dict[str, InterfaceConfig]) -> list[str]:
    """Virtual interfaces with each after the one it sits on (a vlan on a bond after the bond)."""
    virtual = virtual_interfaces(interfaces)
    done: list[str] = []
    placed: set[str] = set()

    def place(name: str, seen: tuple[str, ...]) -> None:
        if name in placed or name in seen:
            return
        below = virtual[name].underlay()
        if virtual[name].kind == "vlan":
            below = virtual[name].vlan_parent_and_id(name)[0]
        if below in virtual:
            place(below, (*seen, name))
        placed.add(name)
        done.append(name)

    for name in virtual:
        place(name, ())
    return done


def required_options(topo: Topology) -> list[tuple[KeyPath, str, str]]:
    """(key path, what, kernel option) for every kind and bridge feature the topology uses."""
    found: list[tuple[KeyPath, str, str]] = []
    for node, spec in topo.nodes.items():
        for ifname, cfg in virtual_interfaces(spec.interfaces).items():
            assert cfg.kind is not None
            found.append((("topology", "nodes", node, "interfaces", ifname, "kind"), cfg.kind, KIND_OPTIONS[cfg.kind]))
        for bridge, config in spec.bridges.items():
            base: KeyPath = ("topology", "nodes", node, "bridges", bridge)
            if config.vlan_filtering:  # port VLANs and fdb vlans need it too: said once, here
                found.append(((*base, "vlan_filtering"), "vlan_filtering", BRIDGE_VLAN_OPTION))
            for key in ("nf_call_iptables", "nf_call_ip6tables", "nf_call_arptables"):
                if getattr(config, key):
                    found.append(((*base, key), key, BRIDGE_NETFILTER_OPTION))
            if not config.mcast_snooping:
                found.append(((*base, "mcast_snooping"), "mcast_snooping", BRIDGE_SNOOPING_OPTION))
    return found


class KindChecker:
    """Cross checks of virtual interfaces and bridge extras within one node (model._Checker calls it)."""

    def __init__(self, topo: Topology, node: str) -> None:
        self.topo = topo
        self.node = node
        self.spec = topo.nodes[node]
        self.base: KeyPath = ("topology", "nodes", node)
        self.problems: list[tuple[KeyPath, str]] = []

    def add(self, path: KeyPath, message: str) -> None:
        self.problems.append((path, message))

    def run(self) -> list[tuple[KeyPath, str]]:
        own = self.topo.interface_names(self.node)
        virtual = virtual_interfaces(self.spec.interfaces)
        if virtual and self.spec.kind == "vm":
            self.add((*self.base, "interfaces"), "a vm node has only NICs; put virtual interfaces in a netns node")
        enslaved: dict[str, str] = {}
        for name, cfg in virtual.items():
            self.check_interface(name, cfg, own, enslaved)
        for name in virtual:
            self.check_cycle(name, virtual)
        for bridge, config in self.spec.bridges.items():
            self.check_bridge(bridge, config, enslaved)
        for name, cfg in self.spec.interfaces.items():
            if cfg.kind is None:
                for key in sorted(ALL_KIND_KEYS):
                    if key in cfg.model_fields_set:
                        self.add(
                            (*self.base, "interfaces", name, key),
                            f"{key!r} belongs to a virtual interface: give {name} a kind"
                            f" ({', '.join(KIND_OPTIONS)}) or remove it",
                        )
        return self.problems

    def check_interface(self, name: str, cfg: InterfaceConfig, own: set[str], enslaved: dict[str, str]) -> None:
        assert cfg.kind is not None
        path: KeyPath = (*self.base, "interfaces", name)
        kind = cfg.kind
        if name in FALLBACK_DEVICES:
            self.add((*path, "kind"), f"{name} is the kernel's own fallback tunnel device; pick another name")
        if name in self.topo.link_interfaces(self.node) or name in self.spec.bridges or name == "lo":
            self.add((*path, "kind"), f"{name} is already made by a link or a bridge; a {kind} needs a name of its own")
        for key in sorted(ALL_KIND_KEYS - KIND_KEYS[kind]):
            if key in cfg.model_fields_set:
                takes = ", ".join(sorted(KIND_KEYS[kind])) or "no keys of its own"
                self.add((*path, key), f"a {kind} has no {key!r} (it takes: {takes})")
        if kind in MODES and cfg.mode is not None and cfg.mode not in MODES[kind]:
            self.add((*path, "mode"), f"{cfg.mode!r} is not a {kind} mode ({', '.join(MODES[kind])})")
        if cfg.parent_node() is not None and kind not in ("macvlan", "ipvlan"):
            self.add((*path, "parent"), f"only a macvlan or ipvlan may sit on another node's interface, not a {kind}")
            return
        if kind == "vlan":
            parent, vid = cfg.vlan_parent_and_id(name)
            if parent is None:
                self.add(path, "a vlan needs a parent (parent: eth0), or a name like eth0.10")
            elif parent not in own:
                self.add((*path, "parent"), self.no_such(parent, own))
            if vid is None:
                self.add(path, "a vlan needs an id (id: 10, 1-4094), or a name like eth0.10")
            elif not 1 <= vid <= 4094:
                self.add(path, f"VLAN id {vid} (from the name) is outside 1-4094")
        elif kind in ("macvlan", "ipvlan"):
            if cfg.parent is None:
                self.add(path, f"a {kind} needs a parent (parent: eth0)")
            elif cfg.parent_node() is not None:
                self.check_foreign_parent(name, cfg)
            elif cfg.parent not in own:
                self.add((*path, "parent"), self.no_such(cfg.parent, own))
            elif self.is_bridge_port(cfg.parent) or self.is_bond_member(cfg.parent):
                # the port's rx_handler is the bridge's (or bond's): a macvlan cannot take it
                what = "a bridge port" if self.is_bridge_port(cfg.parent) else "a bond member"
                self.add((*path, "parent"), f"{cfg.parent} is {what}; the kernel refuses a {kind} on it (EBUSY)")
        elif kind == "vxlan":
            self.check_vxlan(name, cfg, own)
        elif kind in ("gre", "ipip"):
            if cfg.remote is None or cfg.local is None:
                self.add(path, f"a {kind} tunnel needs local and remote addresses")
            elif ipaddress.ip_address(cfg.remote).version != 4 or ipaddress.ip_address(cfg.local).version != 4:
                self.add((*path, "remote"), f"a {kind} tunnel runs over IPv4 (ip6gre/ip6tnl are other kinds)")
        elif kind == "vrf" and cfg.table is None:
            self.add(path, "a vrf needs a routing table (table: 10)")
        if kind in MASTER_KINDS:
            for index, member in enumerate(cfg.members):
                member_path: KeyPath = (*path, "members", index)
                if member not in own:
                    self.add(member_path, self.no_such(member, own))
                elif member in enslaved:
                    self.add(member_path, f"{member} is already a member of {enslaved[member]}")
                elif member == name:
                    self.add(member_path, f"{name} cannot be a member of itself")
                elif kind == "bond" and (member in self.spec.bridges or self.is_bridge_port(member)):
                    self.add(member_path, f"{member} is a bridge or a bridge port; a bond member has no other master")
                elif self.is_bridge_port(member):
                    self.add(
                        member_path,
                        f"{member} is a bridge port; an interface has one master (put the bridge in the vrf)",
                    )
                enslaved[member] = name

    def check_foreign_parent(self, name: str, cfg: InterfaceConfig) -> None:
        """``parent: host:eth0``: the child is born in this node, on a cable end of another (a container's macvlan)."""
        path: KeyPath = (*self.base, "interfaces", name, "parent")
        other, ifname = cfg.parent_node(), cfg.parent_ifname()
        assert other is not None and ifname is not None
        if other not in self.topo.nodes:
            self.add(path, f"unknown node {other!r} (nodes: {', '.join(sorted(self.topo.nodes))})")
        elif other == self.node:
            self.add(path, f"{other} is this node: write parent: {ifname}")
        elif ifname not in self.topo.link_interfaces(other):
            self.add(
                path, f"node {other} has no interface {ifname!r} made by a link (another node's parent must be one)"
            )
        elif any(ifname in c.ports for c in self.topo.nodes[other].bridges.values()):
            self.add(path, f"{other}:{ifname} is a bridge port; the kernel refuses a {cfg.kind} on it (EBUSY)")
        elif self.topo.nodes[other].kind == "vm" or self.spec.kind == "vm":
            self.add(path, "a vm node's NICs are taps fed by a relay; a macvlan needs netns nodes")

    def check_vxlan(self, name: str, cfg: InterfaceConfig, own: set[str]) -> None:
        path: KeyPath = (*self.base, "interfaces", name)
        if cfg.vni is None:
            self.add(path, "a vxlan needs a vni (vni: 42)")
        if cfg.dev is None:
            self.add(path, "a vxlan needs an underlay (dev: eth0): the interface its UDP packets leave by")
        elif cfg.dev not in own:
            self.add((*path, "dev"), self.no_such(cfg.dev, own))
        if cfg.remote is not None and cfg.group is not None:
            self.add((*path, "group"), "a vxlan has either a remote (unicast) or a group (multicast), not both")
        if cfg.group is not None and not ipaddress.ip_address(cfg.group).is_multicast:
            self.add((*path, "group"), f"{cfg.group} is not a multicast address; a unicast peer goes in 'remote'")
        if cfg.remote is not None and ipaddress.ip_address(cfg.remote).is_multicast:
            self.add((*path, "remote"), f"{cfg.remote} is multicast; put it in 'group'")
        families = {ipaddress.ip_address(a).version for a in (cfg.local, cfg.remote, cfg.group) if a is not None}
        if len(families) > 1:
            self.add((*path, "local"), "local and remote/group must be of the same IP version")

    def check_cycle(self, name: str, virtual: dict[str, InterfaceConfig]) -> None:
        seen = [name]
        current = name
        while True:
            cfg = virtual[current]
            below = cfg.vlan_parent_and_id(current)[0] if cfg.kind == "vlan" else cfg.underlay()
            if below not in virtual:
                return
            if below == name:
                self.add(
                    (*self.base, "interfaces", name), f"interfaces sit on each other in a loop: {' -> '.join(seen)}"
                )
                return
            if below in seen:
                return
            seen.append(below)
            current = below

    def check_bridge(self, bridge: str, config: BridgeConfig, enslaved: dict[str, str]) -> None:
        base: KeyPath = (*self.base, "bridges", bridge)
        for port in config.ports:
            if port in enslaved:
                index = config.ports.index(port)
                self.add(
                    (*base, "ports", index), f"{port} is a member of {enslaved[port]}; it cannot be a bridge port too"
                )
        for port, settings in config.port_settings.items():
            if port not in config.ports:
                self.add(
                    (*base, "port_settings", port),
                    f"{port} is not a port of {bridge} (ports: {', '.join(config.ports)})",
                )
            if settings.uses_vlans() and not config.vlan_filtering:
                self.add(
                    (*base, "port_settings", port),
                    "pvid, vids and untagged need the bridge's vlan_filtering: true",
                )
            if isinstance(settings.untagged, list):
                allowed = set(settings.vids) | ({settings.pvid} if settings.pvid else set())
                for index, vid in enumerate(settings.untagged):
                    if vid not in allowed:
                        self.add(
                            (*base, "port_settings", port, "untagged", index), f"VLAN {vid} is not in vids or pvid"
                        )
        for index, entry in enumerate(config.fdb):
            if entry.port not in config.ports:
                self.add((*base, "fdb", index, "port"), f"{entry.port} is not a port of {bridge}")
            if entry.vlan is not None and not config.vlan_filtering:
                self.add((*base, "fdb", index, "vlan"), "an fdb entry's vlan needs the bridge's vlan_filtering: true")
        seen: dict[tuple[str, int | None], int] = {}
        for index, entry in enumerate(config.fdb):
            key = (entry.mac, entry.vlan)
            if key in seen:
                self.add((*base, "fdb", index, "mac"), f"{entry.mac} already has an entry (fdb[{seen[key]}])")
            seen[key] = index

    def is_bond_member(self, name: str) -> bool:
        return any(cfg.kind == "bond" and name in cfg.members for cfg in self.spec.interfaces.values())

    def is_bridge_port(self, name: str) -> bool:
        return any(name in config.ports for config in self.spec.bridges.values())

    def no_such(self, name: str, own: set[str]) -> str:
        return f"node {self.node} has no interface {name!r} (it has: {', '.join(sorted(own))})"
