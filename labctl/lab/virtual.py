"""Build and converge the virtual interface kinds and the bridges' VLAN, port and fdb settings.

Called from :mod:`labctl.lab.build` in three steps: bond and vrf masters
(before the links, so a veth can be born in its vrf), the other kinds (after
the links, which may be their parents), and the bridge settings (after every
port exists).  Each object is read once per node from the kernel and
compared with the file: one that matches is left alone, one that differs
in something only a new device can change (a vxlan's vni, a vlan's parent)
is replaced, a flag that differs is set.  Every change is described in
``changes`` so ``up`` can print exactly what it did.

These kinds are rare in a lab and intricate on the wire, so requests go
through pyroute2 (one socket per node, opened inside it); the plain
veth/bridge fast path of :mod:`labctl.kernel.links` is untouched.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from labctl.errors import KernelError
from labctl.topology.kinds import (
    DEFAULT_MODE,
    MASTER_KINDS,
    MODES,
    PORT_FLAGS,
    BridgeExtras,
    PortSettings,
    creation_order,
    virtual_interfaces,
)

if TYPE_CHECKING:
    from labctl.kernel.links import LinkInfo, NodeLinks
    from labctl.topology.model import BridgeConfig, InterfaceConfig, Topology

NUD_NOARP = 0x40
NTF_MASTER, NTF_STICKY = 0x04, 0x40
BRIDGE_VLAN_INFO_PVID, BRIDGE_VLAN_INFO_UNTAGGED = 0x2, 0x4
VXLAN_PORT = 4789
PORT_ATTRS = {
    "learning": "IFLA_BRPORT_LEARNING",
    "flood": "IFLA_BRPORT_UNICAST_FLOOD",
    "mcast_flood": "IFLA_BRPORT_MCAST_FLOOD",
    "bcast_flood": "IFLA_BRPORT_BCAST_FLOOD",
    "isolated": "IFLA_BRPORT_ISOLATED",
    "hairpin": "IFLA_BRPORT_MODE",
    "neigh_suppress": "IFLA_BRPORT_NEIGH_SUPPRESS",
}
"""A port flag's name in the file -> its IFLA_BRPORT_* attribute (hairpin is the port's 'mode')."""
BRIDGE_ATTRS = ("vlan_filtering", "mcast_snooping", "nf_call_iptables", "nf_call_ip6tables", "nf_call_arptables")


def kind_data(name: str, cfg: InterfaceConfig) -> dict[str, Any]:
    """The IFLA_INFO_DATA attributes (pyroute2 names) a kind's device must carry, parent aside."""
    kind = cfg.kind
    if kind == "vlan":
        return {"IFLA_VLAN_ID": cfg.vlan_parent_and_id(name)[1]}
    if kind == "macvlan":
        return {"IFLA_MACVLAN_MODE": cfg.mode or DEFAULT_MODE["macvlan"]}
    if kind == "ipvlan":
        return {"IFLA_IPVLAN_MODE": MODES["ipvlan"].index(cfg.mode or DEFAULT_MODE["ipvlan"])}
    if kind == "bond":
        return {"IFLA_BOND_MODE": MODES["bond"].index(cfg.mode or DEFAULT_MODE["bond"])}
    if kind == "vrf":
        return {"IFLA_VRF_TABLE": cfg.table}
    if kind == "vxlan":
        data: dict[str, Any] = {"IFLA_VXLAN_ID": cfg.vni, "IFLA_VXLAN_PORT": cfg.port or VXLAN_PORT}
        data["IFLA_VXLAN_LEARNING"] = 1 if cfg.learning is None or cfg.learning else 0
        peer = cfg.remote or cfg.group
        if peer is not None:
            six = ipaddress.ip_address(peer).version == 6
            data["IFLA_VXLAN_GROUP6" if six else "IFLA_VXLAN_GROUP"] = peer
        if cfg.local is not None:
            six = ipaddress.ip_address(cfg.local).version == 6
            data["IFLA_VXLAN_LOCAL6" if six else "IFLA_VXLAN_LOCAL"] = cfg.local
        return data
    if kind in ("gre", "ipip"):
        prefix = f"IFLA_{kind.upper()}"
        data = {f"{prefix}_LOCAL": cfg.local, f"{prefix}_REMOTE": cfg.remote}
        if cfg.ttl is not None:
            data[f"{prefix}_TTL"] = cfg.ttl
        return data
    return {}


def describe(name: str, cfg: InterfaceConfig) -> str:
    """``vx0 (vxlan vni 42 remote 10.0.0.2 dev eth0)``: how ``up`` names an object it changed."""
    keys = ("parent", "id", "mode", "vni", "local", "remote", "group", "port", "dev", "table", "members")
    parts = [f"{key} {_text(value)}" for key in keys if (value := getattr(cfg, key)) not in (None, [])]
    if cfg.kind == "vlan" and cfg.id is None:
        parent, vid = cfg.vlan_parent_and_id(name)
        parts = [f"parent {parent}", f"id {vid}", *parts]
    return f"{name} ({' '.join([str(cfg.kind), *parts])})"


def _file_key(attribute: str) -> str:
    """The lab file's word for an IFLA_* attribute (IFLA_VXLAN_ID -> vni, IFLA_GRE_REMOTE -> remote)."""
    special = {"IFLA_VXLAN_ID": "vni", "IFLA_VLAN_ID": "id", "IFLA_VRF_TABLE": "table"}
    if attribute in special:
        return special[attribute]
    word = attribute.rsplit("_", 1)[-1].lower()
    return {"group": "remote/group", "group6": "remote/group", "local6": "local"}.get(word, word)


def _text(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


class VirtualBuilder:
    """The build steps of one topology's virtual interfaces and bridge settings."""

    def __init__(self, topo: Topology, handles: dict[str, NodeLinks], fresh: set[str]) -> None:
        self.topo = topo
        self.handles = handles
        self.fresh = fresh
        self.changes: list[str] = []
        self._current: dict[str, dict[str, Any]] = {}

    # -- reading ---------------------------------------------------------
    def current(self, node: str) -> dict[str, Any]:
        """name -> the kernel's link message, read once per node and step (a fresh node has none of ours)."""
        if node not in self._current:
            handle = self.handles[node]
            handle.commit()
            self._current[node] = {msg.get("IFLA_IFNAME"): msg for msg in handle.ipr.get_links()}
        return self._current[node]

    def forget(self, node: str) -> None:
        self._current.pop(node, None)
        self.handles[node].refresh()

    def _index(self, node: str, name: str) -> int:
        handle = self.handles[node]
        handle.ensure_indexes({name})
        return handle.index[name]

    def _call(self, node: str, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        handle = self.handles[node]
        handle.commit()
        try:
            return getattr(handle.ipr, method)(*args, **kwargs)
        except NetlinkError as exc:
            raise KernelError(f"{what} in {handle.namespace}: {exc.args[1] if len(exc.args) > 1 else exc}") from exc

    # -- interfaces ------------------------------------------------------
    def masters(self) -> None:
        """Bonds and vrfs, made before the links so their members can be born enslaved."""
        for node, spec in self.topo.nodes.items():
            names = [n for n in creation_order(spec.interfaces) if spec.interfaces[n].kind in MASTER_KINDS]
            self._converge(node, names)

    def interfaces(self) -> None:
        """Every other kind, in dependency order (a vlan after its parent), then bond members enslaved."""
        for node, spec in self.topo.nodes.items():
            names = [n for n in creation_order(spec.interfaces) if spec.interfaces[n].kind not in MASTER_KINDS]
            self._converge(node, names)
            self._masters_of_members(node)
            self._masters_of_virtual(node)

    def _converge(self, node: str, names: list[str]) -> None:
        if not names:
            return
        spec = self.topo.nodes[node]
        for name in names:
            cfg = spec.interfaces[name]
            wanted = kind_data(name, cfg)
            parent = cfg.vlan_parent_and_id(name)[0] if cfg.kind == "vlan" else cfg.underlay()
            have = None if node in self.fresh else self.current(node).get(name)
            if have is not None:
                reason = self._difference(node, have, cfg, wanted, parent)
                if reason is None:
                    continue
                self._call(node, f"{cfg.kind} {name}", "link", "del", index=have["index"])
                self.handles[node].index.pop(name, None)
                self.changes.append(f"{node}: replaced {describe(name, cfg)}: {reason}")
            else:
                self.changes.append(f"{node}: created {describe(name, cfg)}")
            kwargs: dict[str, Any] = {key.removeprefix("IFLA_").lower(): value for key, value in wanted.items()}
            if parent is not None and cfg.kind != "vxlan":
                kwargs["link"] = self._index(node, parent)
            if cfg.kind == "vxlan" and parent is not None:
                kwargs["vxlan_link"] = self._index(node, parent)
            foreign = cfg.parent_node()
            if foreign is not None:
                self._create_on_foreign_parent(node, name, cfg, foreign, kwargs)
            else:
                self._call(node, f"{cfg.kind} {name}", "link", "add", ifname=name, kind=cfg.kind, **kwargs)
            self.forget(node)

    def _create_on_foreign_parent(
        self, node: str, name: str, cfg: InterfaceConfig, foreign: str, kwargs: dict[str, Any]
    ) -> None:
        """Ask the parent's namespace to make the child straight inside ``node`` (like ``ip link add ... netns``).

        The kernel looks the parent up where the request is made and registers
        the new device in the namespace IFLA_NET_NS_FD names: it never exists
        anywhere else, and never in the root namespace.
        """
        import os

        from labctl.kernel import netns

        parent_ifname = cfg.parent_ifname()
        assert parent_ifname is not None
        kwargs["link"] = self._index(foreign, parent_ifname)
        fd = os.open(netns.path(self.handles[node].namespace), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._call(
                foreign,
                f"{cfg.kind} {name} for {node}",
                "link",
                "add",
                ifname=name,
                kind=cfg.kind,
                net_ns_fd=fd,
                **kwargs,
            )
        finally:
            os.close(fd)

    def _difference(
        self, node: str, have: Any, cfg: InterfaceConfig, wanted: dict[str, Any], parent: str | None
    ) -> str | None:
        """Why the existing device is not the wanted one (None: it is)."""
        info = have.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info is not None else None
        if kind != cfg.kind:
            return f"it was a {kind or 'plain device'}"
        data = info.get("IFLA_INFO_DATA")
        for key, value in wanted.items():
            seen = data.get(key) if data is not None else None
            if isinstance(seen, bool):
                seen = int(seen)
            if seen != value and str(seen) != str(value):
                return f"{_file_key(key)} was {seen}"
        if cfg.parent_node() is not None:
            foreign, parent_ifname = cfg.parent_node(), cfg.parent_ifname()
            assert foreign is not None and parent_ifname is not None
            if have.get("IFLA_LINK") != self._index(foreign, parent_ifname):
                return f"it sat on another interface (ifindex {have.get('IFLA_LINK')} of another namespace)"
        elif parent is not None:
            link_key = "IFLA_VXLAN_LINK" if cfg.kind == "vxlan" else None
            seen_parent = data.get(link_key) if link_key and data is not None else have.get("IFLA_LINK")
            if seen_parent != self._index(node, parent):
                return f"it sat on another interface (ifindex {seen_parent})"
        return None

    def _masters_of_members(self, node: str) -> None:
        """Bond members go down before they are enslaved (the bond opens them itself)."""
        spec = self.topo.nodes[node]
        for name, cfg in virtual_interfaces(spec.interfaces).items():
            if cfg.kind != "bond":
                continue
            bond = self._index(node, name)
            for member in cfg.members:
                have = self.current(node).get(member)
                if have is not None and have.get("IFLA_MASTER") == bond:
                    continue
                index = self._index(node, member)
                self._call(node, f"bond member {member}", "link", "set", index=index, state="down")
                self._call(node, f"bond member {member}", "link", "set", index=index, master=bond)
                self.changes.append(f"{node}: enslaved {member} to bond {name}")
                self._current.pop(node, None)

    def _masters_of_virtual(self, node: str) -> None:
        """A virtual interface or bridge that is a bridge port or vrf member gets (or leaves) its master here.

        Interfaces made by links get theirs from the link step; these are
        made here, so their membership is converged here too.
        """
        spec = self.topo.nodes[node]
        virtual = virtual_interfaces(spec.interfaces)
        if not virtual:
            return
        wanted: dict[str, str | None] = {name: None for name in virtual}
        if any(cfg.kind == "vrf" for cfg in virtual.values()):
            wanted.update({bridge: None for bridge in spec.bridges})  # a bridge may join or leave a vrf
        for bridge, config in spec.bridges.items():
            for port in config.ports:
                if port in virtual:
                    wanted[port] = bridge
        for name, cfg in virtual.items():
            if cfg.kind == "vrf":
                for member in cfg.members:
                    if member in virtual or member in spec.bridges:
                        wanted[member] = name
        for name, master in wanted.items():
            have = self.current(node).get(name)
            if have is None:
                continue
            seen = have.get("IFLA_MASTER") or 0
            target = self._index(node, master) if master else 0
            if seen == target:
                continue
            if name in virtual and master is None and self._enslaved_by_bond(node, name):
                continue
            self._call(node, f"master of {name}", "link", "set", index=self._index(node, name), master=target)
            self.changes.append(f"{node}: {name} " + (f"joined {master}" if master else "left its master"))
            self._current.pop(node, None)

    def _enslaved_by_bond(self, node: str, name: str) -> bool:
        spec = self.topo.nodes[node]
        return any(cfg.kind == "bond" and name in cfg.members for cfg in spec.interfaces.values())

    # -- bridges ---------------------------------------------------------
    def bridges(self) -> None:
        """Bridge options, port flags, port VLANs and static fdb entries, each set only where it differs.

        The kernel's view is read with labctl's raw dumps (one link dump, one
        fdb dump per node), which decode exactly these settings; a new bridge
        whose file asks for nothing beyond the kernel's defaults is not read.
        """
        for node, spec in self.topo.nodes.items():
            if not spec.bridges:
                continue
            if node in self.fresh and all(_all_defaults(config) for config in spec.bridges.values()):
                continue
            handle = self.handles[node]
            handle.commit()
            links = handle.links()
            fdb = handle.static_fdb() if any(c.fdb for c in spec.bridges.values()) or node not in self.fresh else []
            for bridge, config in spec.bridges.items():
                self._bridge_options(node, bridge, config, links.get(bridge))
                for port in config.ports:
                    self._port(node, bridge, port, config, links.get(port))
                self._fdb(node, bridge, config, [entry for entry in fdb if entry["bridge"] == bridge])

    def _bridge_options(self, node: str, bridge: str, config: BridgeConfig, have: LinkInfo | None) -> None:
        seen = have.details if have is not None else {}
        changed = _differing(seen, config, _DEFAULT_BRIDGE, BRIDGE_ATTRS)
        if not changed:
            return
        self.changes.append(
            f"{node}: bridge {bridge} " + ", ".join(f"{key} {'on' if v else 'off'}" for key, v in changed.items())
        )
        kwargs = {f"br_{key}": value for key, value in changed.items()}
        self._call(node, f"bridge {bridge}", "link", "set", index=self._index(node, bridge), kind="bridge", **kwargs)

    def _port(self, node: str, bridge: str, port: str, config: BridgeConfig, have: LinkInfo | None) -> None:
        settings = config.port_settings.get(port, _DEFAULT_PORT)
        seen = have.port if have is not None else {}
        changed = _differing(seen, settings, _DEFAULT_PORT, PORT_FLAGS)
        if changed:
            kwargs = {PORT_ATTRS[flag].removeprefix("IFLA_BRPORT_").lower(): value for flag, value in changed.items()}
            self._call(node, f"bridge port {port}", "brport", "set", index=self._index(node, port), **kwargs)
            self.changes.append(
                f"{node}: {bridge} port {port} " + ", ".join(f"{f} {'on' if v else 'off'}" for f, v in changed.items())
            )
        if config.vlan_filtering:
            self._port_vlans(node, bridge, port, settings.vlans())

    def _port_vlans(self, node: str, bridge: str, port: str, wanted: dict[int, tuple[bool, bool]]) -> None:
        """The port's VLAN table: vid -> (pvid, untagged), read from an AF_BRIDGE dump with vlan info."""
        index = self._index(node, port)
        have: dict[int, tuple[bool, bool]] = {}
        for msg in self._call(node, f"vlans of {port}", "get_vlans"):
            if msg["index"] != index:
                continue
            spec = msg.get_attr("IFLA_AF_SPEC")
            for info in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO") if spec is not None else []:
                flags = info["flags"]
                have[info["vid"]] = (bool(flags & BRIDGE_VLAN_INFO_PVID), bool(flags & BRIDGE_VLAN_INFO_UNTAGGED))
        for vid in sorted(set(have) - set(wanted)):
            self._call(node, f"vlan {vid} on {port}", "vlan_filter", "del", index=index, vlan_info={"vid": vid})
            self.changes.append(f"{node}: {bridge} port {port} left vlan {vid}")
        for vid, (pvid, untagged) in sorted(wanted.items()):
            if have.get(vid) == (pvid, untagged):
                continue
            flags = (BRIDGE_VLAN_INFO_PVID if pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if untagged else 0)
            self._call(
                node, f"vlan {vid} on {port}", "vlan_filter", "add", index=index, vlan_info={"vid": vid, "flags": flags}
            )
            words = " ".join(w for w, on in (("pvid", pvid), ("untagged", untagged)) if on)
            self.changes.append(f"{node}: {bridge} port {port} vlan {vid} {words}".rstrip())

    def _fdb(self, node: str, bridge: str, config: BridgeConfig, have_entries: list[dict[str, Any]]) -> None:
        """Static (and sticky) entries: those the file does not ask for are removed, the missing ones added."""
        have = {(e["mac"], e["vlan"]): (e["port"], e["sticky"]) for e in have_entries}
        wanted = {(e.mac, e.vlan): e for e in config.fdb}
        for (mac, vlan), (port, sticky) in have.items():
            entry = wanted.get((mac, vlan))
            if entry is not None and (entry.port, entry.sticky) == (port, sticky):
                continue
            extra = {"vlan": vlan} if vlan is not None else {}
            index = self._index(node, port)
            self._call(node, f"fdb {mac}", "fdb", "del", ifindex=index, lladdr=mac, flags=NTF_MASTER, **extra)
            if entry is None:
                self.changes.append(f"{node}: {bridge} fdb {mac} on {port} removed")
        for key, entry in wanted.items():
            if have.get(key) == (entry.port, entry.sticky):
                continue
            extra = {"vlan": entry.vlan} if entry.vlan is not None else {}
            self._call(
                node,
                f"fdb {entry.mac} on {entry.port}",
                "fdb",
                "add",
                ifindex=self._index(node, entry.port),
                lladdr=entry.mac,
                state=NUD_NOARP,
                flags=NTF_MASTER | (NTF_STICKY if entry.sticky else 0),
                **extra,
            )
            sticky = " sticky" if entry.sticky else ""
            self.changes.append(f"{node}: {bridge} fdb {entry.mac} on {entry.port} static{sticky}")


_DEFAULT_PORT = PortSettings()
_DEFAULT_BRIDGE = BridgeExtras()


def _differing(seen: dict[str, Any], wanted: Any, default: Any, keys: tuple[str, ...]) -> dict[str, int]:
    """The settings (as 0/1) whose kernel value differs from the file's.

    A setting the kernel does not report is one it is built without (no
    IGMP snooping, say): left alone while the file asks for its default, so
    a second ``up`` is still a no-op there.
    """
    changed = {}
    for key in keys:
        value = int(getattr(wanted, key))
        if key not in seen and value == int(getattr(default, key)):
            continue
        if seen.get(key) != value:
            changed[key] = value
    return changed


def _all_defaults(config: BridgeConfig) -> bool:
    """A bridge whose file asks for nothing the kernel does not do by itself (a new one needs no reading)."""
    return (
        all(getattr(config, key) == getattr(_DEFAULT_BRIDGE, key) for key in BRIDGE_ATTRS)
        and not config.fdb
        and all(settings == _DEFAULT_PORT for settings in config.port_settings.values())
    )
