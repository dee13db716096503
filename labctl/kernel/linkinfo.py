"""What the kernel says about a namespace's interfaces: a link dump decoded into :class:`LinkInfo`.

Shared by :meth:`labctl.kernel.links.NodeLinks.links` and the readers of
many namespaces at once (status): the decoding copies only the attributes
shown, and names the kind-specific settings (a vxlan's vni, a bridge's
vlan_filtering, a port's flags) the status view and converge compare.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from labctl.kernel.netlink import (
    _IFINFO,
    IFLA_ADDRESS,
    IFLA_AF_SPEC,
    IFLA_CARRIER,
    IFLA_IFALIAS,
    IFLA_IFNAME,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_INFO_SLAVE_DATA,
    IFLA_INFO_SLAVE_KIND,
    IFLA_LINK,
    IFLA_LINK_NETNSID,
    IFLA_LINKINFO,
    IFLA_MASTER,
    IFLA_MTU,
    IFLA_OPERSTATE,
    IFLA_STATS64,
    IFLA_TXQLEN,
    _attrs,
    _cstr,
    _mac,
)

IFF_UP = 0x1
IFF_PROMISC = 0x100
MACVLAN_MODES = {1: "private", 2: "vepa", 4: "bridge", 8: "passthru", 16: "source"}
BOND_MODES = ("balance-rr", "active-backup", "balance-xor", "broadcast", "802.3ad", "balance-tlb", "balance-alb")
KIND_DETAILS: dict[str, dict[int, tuple[str, str]]] = {
    "vlan": {1: ("id", "u16")},
    "macvlan": {1: ("mode", "macvlan")},
    "ipvlan": {1: ("mode", "ipvlan")},
    "vxlan": {
        1: ("vni", "u32"),
        2: ("remote", "ip4"),
        3: ("dev_index", "u32"),
        4: ("local", "ip4"),
        7: ("learning", "u8"),
        15: ("port", "be16"),
        16: ("remote", "ip6"),
        17: ("local", "ip6"),
    },
    "bond": {1: ("mode", "bond")},
    "vrf": {1: ("table", "u32")},
    "gre": {6: ("local", "ip4"), 7: ("remote", "ip4"), 8: ("ttl", "u8")},
    "ipip": {2: ("local", "ip4"), 3: ("remote", "ip4"), 4: ("ttl", "u8")},
    "bridge": {
        5: ("stp", "u32"),
        7: ("vlan_filtering", "u8"),
        23: ("mcast_snooping", "u8"),
        36: ("nf_call_iptables", "u8"),
        37: ("nf_call_ip6tables", "u8"),
        38: ("nf_call_arptables", "u8"),
    },
}
"""IFLA_INFO_DATA attributes shown by status: kind -> attribute number -> (name, encoding) (linux/if_link.h)."""
BRPORT_DETAILS: dict[int, tuple[str, str]] = {
    8: ("learning", "u8"),
    9: ("flood", "u8"),
    27: ("mcast_flood", "u8"),
    30: ("bcast_flood", "u8"),
    33: ("isolated", "u8"),
    4: ("hairpin", "u8"),
    32: ("neigh_suppress", "u8"),
}
"""A bridge port's flags, from IFLA_INFO_SLAVE_DATA (IFLA_BRPORT_*)."""
_NAME_ONLY = frozenset({IFLA_IFNAME})
_NAME_AND_STATE = frozenset({IFLA_IFNAME, IFLA_OPERSTATE})
_NAME_AND_AF = frozenset({IFLA_IFNAME, IFLA_AF_SPEC})
_SHOWN = frozenset(
    {IFLA_IFNAME, IFLA_LINKINFO, IFLA_MASTER, IFLA_LINK, IFLA_STATS64, IFLA_CARRIER, IFLA_ADDRESS, IFLA_MTU}
    | {IFLA_TXQLEN, IFLA_IFALIAS, IFLA_LINK_NETNSID}  # the netnsid: a vlan's parent in another namespace
)
"""What ``links()`` reads: copying only these (of some fifty per link) halves the parsing of a status."""
OPERSTATES = {0: "UNKNOWN", 1: "NOTPRESENT", 2: "DOWN", 3: "LOWERLAYERDOWN", 4: "TESTING", 5: "DORMANT", 6: "UP"}
STATS64 = (  # struct rtnl_link_stats64, in order (pyroute2's names)
    *("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors", "rx_dropped", "tx_dropped"),
    *("multicast", "collisions", "rx_length_errors", "rx_over_errors", "rx_crc_errors", "rx_frame_errors"),
    *("rx_fifo_errors", "rx_missed_errors", "tx_aborted_errors", "tx_carrier_errors", "tx_fifo_errors"),
    *("tx_heartbeat_errors", "tx_window_errors", "rx_compressed", "tx_compressed"),
)


@dataclass
class LinkInfo:
    """What the kernel says about an interface (the status view and converge use it)."""

    index: int
    name: str
    kind: str
    up: bool
    carrier: bool
    promisc: bool
    mac: str
    mtu: int
    txqueuelen: int
    master: str | None
    addresses: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    alias: str | None = None
    link_index: int | None = None
    """A veth's peer ifindex (in the peer's namespace), from IFLA_LINK."""
    details: dict[str, Any] = field(default_factory=dict)
    """Kind-specific settings (a vxlan's vni, a vlan's id, a bridge's vlan_filtering ...), see KIND_DETAILS."""
    port: dict[str, Any] = field(default_factory=dict)
    """A bridge port's flags (learning, flood, isolated ...); empty when not a bridge port."""


def _decode_details(table: dict[int, tuple[str, str]], payload: bytes) -> dict[str, Any]:
    """Decode the attributes of ``table`` found in a nested IFLA_INFO_DATA / SLAVE_DATA payload."""
    found: dict[str, Any] = {}
    for kind, data in _attrs(payload, 0, frozenset(table)).items():  # stops once all are found (a port has ~40)
        name, encoding = table[kind]
        if encoding in ("u8", "u16", "u32") and len(data) >= {"u8": 1, "u16": 2, "u32": 4}[encoding]:
            found[name] = int.from_bytes(data[: {"u8": 1, "u16": 2, "u32": 4}[encoding]], "little")
        elif encoding == "be16" and len(data) >= 2:
            found[name] = int.from_bytes(data[:2], "big")
        elif encoding in ("ip4", "ip6") and len(data) in (4, 16):
            found[name] = socket.inet_ntop(socket.AF_INET if len(data) == 4 else socket.AF_INET6, data)
        elif encoding == "macvlan" and len(data) >= 4:
            mode = int.from_bytes(data[:4], "little")
            found[name] = MACVLAN_MODES.get(mode, str(mode))
        elif encoding == "ipvlan" and len(data) >= 2:
            mode = int.from_bytes(data[:2], "little")
            found[name] = ("l2", "l3", "l3s")[mode] if mode < 3 else str(mode)
        elif encoding == "bond" and len(data) >= 1:
            found[name] = BOND_MODES[data[0]] if data[0] < len(BOND_MODES) else str(data[0])
    return found


def decode_links(raw: list[tuple[int, dict[int, bytes], int]]) -> dict[str, LinkInfo]:
    """Interfaces by name from a link dump's (index, attributes read with ``_SHOWN``, flags).

    Shared by :meth:`NodeLinks.links` and the readers of many namespaces
    (:mod:`labctl.kernel.snapshot`); addresses are filled in by the caller.
    """
    by_index = {index: _cstr(attrs[IFLA_IFNAME]) for index, attrs, _ in raw}
    foreign_parent = {index for index, attrs, _ in raw if IFLA_LINK_NETNSID in attrs}
    result: dict[str, LinkInfo] = {}
    for index, attrs, flags in raw:
        name = by_index[index]
        info = _attrs(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
        kind = _cstr(info[IFLA_INFO_KIND]) if IFLA_INFO_KIND in info else ("loopback" if name == "lo" else "device")
        details = (
            _decode_details(KIND_DETAILS[kind], info[IFLA_INFO_DATA])
            if kind in KIND_DETAILS and IFLA_INFO_DATA in info
            else {}
        )
        bridge_port = (
            _decode_details(BRPORT_DETAILS, info[IFLA_INFO_SLAVE_DATA])
            if IFLA_INFO_SLAVE_DATA in info and _cstr(info.get(IFLA_INFO_SLAVE_KIND, b"")) == "bridge"
            else {}
        )
        master = struct.unpack("=I", attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else 0
        link = struct.unpack("=I", attrs[IFLA_LINK])[0] if IFLA_LINK in attrs else 0
        stats = attrs.get(IFLA_STATS64)
        result[name] = LinkInfo(
            index=index,
            name=name,
            kind=kind,
            up=bool(flags & IFF_UP),
            carrier=bool(attrs.get(IFLA_CARRIER, b"\0")[0]),
            promisc=bool(flags & IFF_PROMISC),
            mac=_mac(attrs[IFLA_ADDRESS]) if IFLA_ADDRESS in attrs else "",
            mtu=struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
            txqueuelen=struct.unpack("=I", attrs[IFLA_TXQLEN])[0] if IFLA_TXQLEN in attrs else 0,
            master=by_index.get(master) if master else None,
            stats=dict(zip(STATS64, struct.unpack_from(f"={len(STATS64)}Q", stats), strict=True)) if stats else {},
            alias=_cstr(attrs[IFLA_IFALIAS]) if IFLA_IFALIAS in attrs else None,
            link_index=link if link and link != index else None,
            details=details,
            port=bridge_port,
        )
    for found in result.values():  # indexes named: a vxlan's underlay, a vlan's parent
        if found.kind == "vxlan" and ipaddress.ip_address(found.details.get("remote", "0.0.0.0")).is_multicast:
            found.details["group"] = found.details.pop("remote")  # IFLA_VXLAN_GROUP holds either
        dev_index = found.details.pop("dev_index", None)
        if dev_index:
            found.details["dev"] = by_index.get(dev_index, str(dev_index))
        if found.kind in ("vlan", "macvlan", "ipvlan") and found.link_index:
            local = found.index not in foreign_parent
            found.details["parent"] = (
                by_index.get(found.link_index, str(found.link_index))
                if local
                else f"ifindex {found.link_index} of another namespace"
            )
    return result


LINK_DUMP = _IFINFO.pack(0, 0, 0, 0, 0)
"""An RTM_GETLINK dump request of every interface."""
