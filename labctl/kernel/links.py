"""Interfaces, addresses and routes of one namespace, over one netlink socket.

One :class:`NodeLinks` per namespace holds a single rtnetlink socket opened
inside it, so a whole node is configured without a helper process and with
as few round trips as the kernel allows: a veth is created with both ends
already in their namespaces (nothing ever appears in the root namespace),
with index, master, MTU, MAC and state of *both* ends in the same request.

The messages are encoded here with ``struct`` rather than through pyroute2:
pyroute2 0.9 runs every request through an asyncio loop (about 1.4 ms a
request, 1.2 ms to open a socket, 0.2 s to import), which made a lab of a
thousand nodes spend seconds in Python for milliseconds of kernel work.  A
handle made with ``batch=True`` queues its changes and sends them in one
write per :meth:`NodeLinks.commit`, then reads every acknowledgement; an
error still names the object it was about.  pyroute2 stays for what is rare
and intricate (ethtool features, qdiscs, tap devices, ``route get``), opened
on first use through :attr:`NodeLinks.ipr`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labctl.kernel import netns

if TYPE_CHECKING:
    from pyroute2 import IPRoute

PEER_ALIAS = "labctl peer "
"""Prefix of the ifalias labctl gives each link end; the far end's ``node:interface`` follows."""
IFF_UP = 0x1
IFF_PROMISC = 0x100
RTPROT_LABCTL = 4  # "static": routes labctl added, so converge only touches its own
ROUTE_TABLE_MAIN = 254

# netlink and rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h)
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_TXQLEN, IFLA_IFALIAS = 1, 3, 4, 5, 10, 13, 20
IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_STATS64, IFLA_NET_NS_FD, IFLA_CARRIER = 16, 18, 23, 28, 33
IFLA_AF_SPEC, IFLA_INET6_CONF, DEVCONF_DISABLE_IPV6 = 26, 2, 26
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
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
VETH_INFO_PEER = 1
IFLA_BR_FORWARD_DELAY, IFLA_BR_AGEING_TIME, IFLA_BR_STP_STATE = 1, 4, 5
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_FLAGS = 8  # u32: the full flags (ifa_flags in the header holds only the low 8 bits)
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
RTN_UNICAST = 1
NLA_F_NESTED = 0x8000
OPERSTATES = {0: "UNKNOWN", 1: "NOTPRESENT", 2: "DOWN", 3: "LOWERLAYERDOWN", 4: "TESTING", 5: "DORMANT", 6: "UP"}
STATS64 = (  # struct rtnl_link_stats64, in order (pyroute2's names)
    *("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors", "rx_dropped", "tx_dropped"),
    *("multicast", "collisions", "rx_length_errors", "rx_over_errors", "rx_crc_errors", "rx_frame_errors"),
    *("rx_fifo_errors", "rx_missed_errors", "tx_aborted_errors", "tx_carrier_errors", "tx_fifo_errors"),
    *("tx_heartbeat_errors", "tx_window_errors", "rx_compressed", "tx_compressed"),
)
_NLA = struct.Struct("=HH")
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_BATCH_BYTES = 16384  # one write: at most a few hundred requests, whose acks fit in _RCVBUF
_RCVBUF = 1 << 21
SO_RCVBUFFORCE = 33
RTM_GETQDISC = 38


@dataclass(frozen=True)
class LinkAttrs:
    """Settings applied to an interface at creation or on converge."""

    mac: str | None = None
    mtu: int | None = None
    txqueuelen: int | None = None
    promisc: bool = False
    up: bool = True
    master: str | None = None
    detach: bool = False
    """With no master: take the interface out of any bridge it is in (converge)."""
    alias: str | None = None
    """The device's ifalias; labctl writes the far end of the link there ("labctl peer h1:eth0")."""


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


# -- encoding and decoding -----------------------------------------------------
def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _text(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _nested(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _attrs(data: bytes, offset: int = 0, wanted: frozenset[int] | None = None) -> dict[int, bytes]:
    """type -> payload of the attributes in ``data[offset:]`` (the nested flag dropped).

    With ``wanted``, only those are kept and decoding stops once all are
    found: a link carries some fifty attributes, and a big lab is dumped
    a few times per node.
    """
    found: dict[int, bytes] = {}
    end = len(data)
    unpack = _NLA.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        kind &= 0x3FFF
        if wanted is None or kind in wanted:
            found[kind] = data[offset + 4 : offset + length]
            if wanted is not None and len(found) == len(wanted):
                break
        offset += (length + 3) & ~3
    return found


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


def decode_vlan_infos(af_spec: bytes, vlan_info_type: int = 2) -> dict[int, str]:
    """vid -> "pvid untagged" / "untagged" / "tagged" from an AF_BRIDGE IFLA_AF_SPEC payload (repeated attributes)."""
    PVID, UNTAGGED = 0x2, 0x4
    vlans: dict[int, str] = {}
    offset = 0
    while offset + 4 <= len(af_spec):
        length, kind = _NLA.unpack_from(af_spec, offset)
        if length < 4:
            break
        if kind & 0x3FFF == vlan_info_type and length >= 8:
            flags, vid = struct.unpack_from("=HH", af_spec, offset + 4)
            words = [word for word, bit in (("pvid", PVID), ("untagged", UNTAGGED)) if flags & bit]
            vlans[vid] = " ".join(words) or "tagged"
        offset += (length + 3) & ~3
    return vlans
attributes = _attrs
"""The attribute parser, for the other rtnetlink readers of the kernel layer (counters.py's qdiscs)."""


def _cstr(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode()


def _mac(payload: bytes) -> str:
    return payload.hex(":")  # C speed: the generator cost 5 µs a MAC, 15 ms of a 1000-node status


def _ip_text(family: int, payload: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == socket.AF_INET else socket.AF_INET6, payload)


def _ip_bytes(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address)
    return (socket.AF_INET if ip.version == 4 else socket.AF_INET6), ip.packed


_RECEIVE_BYTES = 1 << 20
"""Room for the largest netlink datagram labctl reads (a dump's part is at most 32 KiB)."""
_receiving = threading.local()


def _receive(sock: socket.socket) -> bytes:
    """One datagram, read into this thread's buffer and copied out at its own size.

    ``sock.recv(1 << 20)`` allocates a fresh megabyte per call, which glibc
    maps and unmaps each time: three system calls and page faults around
    every netlink read, 30 µs -- more than the kernel's answer to a small
    dump, and at a thousand namespaces most of a status.
    """
    buffer = getattr(_receiving, "buffer", None)
    if buffer is None:
        buffer = _receiving.buffer = bytearray(_RECEIVE_BYTES)
    size = sock.recv_into(buffer)
    return bytes(memoryview(buffer)[:size])


class Netlink:
    """A raw netlink socket: requests are queued, written together, and every ack is read.

    The kernel handles the messages of one write in order and answers each
    (an ack or an error), so a batch costs one system call each way instead
    of a round trip per object.
    """

    def __init__(self, protocol: int = NETLINK_ROUTE, dumps_only: bool = False) -> None:
        """``dumps_only``: a socket that only reads dumps (status) needs neither the big receive buffer
        nor an explicit bind (the kernel binds it on the first send): two system calls fewer a socket."""
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        if not dumps_only:
            try:  # a batch's acks wait in the receive buffer until it is read: room for thousands
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            self.sock.bind((0, 0))
        self.seq = 0
        self.pending: list[tuple[int, str, bytes, int | None]] = []  # seq, what it is about, message, fd

    def close(self) -> None:
        for *_, fd in self.pending:
            if fd is not None:
                os.close(fd)
        self.pending = []
        self.sock.close()

    def queue(self, what: str, kind: int, flags: int, body: bytes, fd: int | None = None) -> None:
        """Queue a request; ``fd`` (a namespace it names) is closed once the request is sent."""
        self.seq += 1
        header = _HDR.pack(16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, 0)
        self.pending.append((self.seq, what, header + body, fd))

    def commit(self) -> list[tuple[str, int]]:
        """Send everything queued; return (what, errno) of each request the kernel refused."""
        failed: list[tuple[str, int]] = []
        while self.pending:
            chunk: list[tuple[int, str, bytes, int | None]] = []
            size = 0
            while self.pending and (not chunk or size + len(self.pending[0][2]) <= _BATCH_BYTES):
                chunk.append(self.pending.pop(0))
                size += len(chunk[-1][2])
            try:
                self.sock.sendto(b"".join(message for _, _, message, _ in chunk), (0, 0))
            finally:
                for *_, fd in chunk:
                    if fd is not None:
                        os.close(fd)
            waiting = {seq: what for seq, what, _, _ in chunk}
            while waiting:
                for kind, seq, data, offset in self._messages():
                    if kind == NLMSG_ERROR and seq in waiting:
                        code = -struct.unpack_from("=i", data, offset)[0]
                        what = waiting.pop(seq)
                        if code:
                            failed.append((what, code))
        return failed

    def dump(self, kind: int, body: bytes) -> Iterator[tuple[int, bytes, int]]:
        """(type, buffer, offset of the payload) of each message a dump request returns."""
        return self._request(kind, NLM_F_REQUEST | NLM_F_DUMP, body)

    def _request(self, kind: int, flags: int, body: bytes) -> Iterator[tuple[int, bytes, int]]:
        self.seq += 1
        seq = self.seq
        self.sock.sendto(_HDR.pack(16 + len(body), kind, flags, seq, 0) + body, (0, 0))
        while True:
            for msg_kind, msg_seq, data, offset in self._messages():
                if msg_seq != seq:
                    continue
                if msg_kind == NLMSG_DONE:
                    return
                if msg_kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return
                yield msg_kind, data, offset

    def dump_all(self, kind: int, body: bytes) -> list[bytes]:
        """Every message of a dump, read at once (each its own bytes; the payload starts at byte 16).

        The lean form of :meth:`dump` for readers of many namespaces: no
        generator and no tuple per message, which at a thousand namespaces
        cost more than the kernel's own answer (bench/bench_cli.py, status).
        """
        self.seq += 1
        seq = self.seq
        sock = self.sock
        sock.send(_HDR.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        found: list[bytes] = []
        unpack = _HDR.unpack_from
        while True:
            data = _receive(sock)
            offset, size = 0, len(data)
            while offset + 16 <= size:
                length, msg_kind, _, msg_seq, _ = unpack(data, offset)
                if length < 16:
                    break
                if msg_seq == seq:
                    if msg_kind == NLMSG_DONE:
                        return found
                    if msg_kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        if code:
                            raise OSError(code, os.strerror(code))
                        return found
                    found.append(data[offset : offset + length])
                offset += (length + 3) & ~3

    def get(self, kind: int, body: bytes) -> tuple[int, bytes, int]:
        """The one answer to a request that is not a dump (``ip route get``); OSError when refused."""
        for answer in self._request(kind, NLM_F_REQUEST, body):
            return answer
        raise OSError(errno.ENODATA, "no answer")

    def _messages(self) -> list[tuple[int, int, bytes, int]]:
        data = _receive(self.sock)
        found = []
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _, seq, _ = _HDR.unpack_from(data, offset)
            found.append((kind, seq, data[offset : offset + length], 16))
            offset += (length + 3) & ~3
        return found


def _kernel_error(what: str, namespace: str, code: int) -> OSError:
    return OSError(code, f"{what} in {namespace}: {os.strerror(code)}")


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
ADDRESS_DUMP = _IFADDR.pack(0, 0, 0, 0, 0)
"""An RTM_GETADDR dump request of every family."""


def decode_addresses(messages: list[bytes], names: dict[int, str]) -> dict[str, list[str]]:
    """Interface name -> ``address/prefixlen`` of an address dump's messages (payload at byte 16)."""
    found: dict[str, list[str]] = {}
    for data in messages:
        family, prefixlen, _, _, index = _IFADDR.unpack_from(data, 16)
        attrs = _attrs(data, 16 + _IFADDR.size)
        address = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
        if address is None:
            continue
        name = names.get(index, str(index))
        found.setdefault(name, []).append(f"{_ip_text(family, address)}/{prefixlen}")
    return found


ROUTE_DUMP = _RTMSG.pack(0, 0, 0, 0, 0, 0, 0, 0, 0)
"""An RTM_GETROUTE dump request of every family and table."""
RT_TABLE_COMPAT = 252  # rtm_table of a route whose table id does not fit in 8 bits (RTA_TABLE has it)


def decode_routes(messages: list[bytes], names: dict[int, str], own_only: bool = False) -> list[dict[str, Any]]:
    """The main table's IPv4 and IPv6 routes of a route dump's messages, with interface names.

    The header's table decides before any attribute is read: most of a
    namespace's routes are the local table's (an address's local and
    broadcast entries), which status never shows.
    """
    result = []
    for data in messages:
        family, dst_len, _, _, table, proto, _, _, _ = _RTMSG.unpack_from(data, 16)
        if family not in (socket.AF_INET, socket.AF_INET6) or table not in (ROUTE_TABLE_MAIN, RT_TABLE_COMPAT):
            continue
        attrs = _attrs(data, 16 + _RTMSG.size)
        if RTA_TABLE in attrs:
            table = struct.unpack("=I", attrs[RTA_TABLE])[0]
        if table != ROUTE_TABLE_MAIN or (own_only and proto != RTPROT_LABCTL):
            continue
        oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
        result.append(
            {
                "dst": f"{_ip_text(family, attrs[RTA_DST])}/{dst_len}" if RTA_DST in attrs else "default",
                "via": _ip_text(family, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None,
                "dev": names.get(oif) if oif is not None else None,
                "proto": proto,
                "family": family,
            }
        )
    return result


class NodeLinks:
    """Netlink access to one namespace; create it once per node and reuse it.

    With ``batch=True`` changes wait in a queue until :meth:`commit` (a read
    commits first, so it always sees them); otherwise each change is sent and
    acknowledged at once.
    """

    def __init__(self, namespace: str, nl: Netlink | None = None, batch: bool = False) -> None:
        self.namespace = namespace
        if nl is None:
            with netns.entered(namespace):
                nl = Netlink()
        self.nl = nl
        self.batch = batch
        self.index: dict[str, int] = {}
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        """A pyroute2 socket in the same namespace, for what this module does not encode itself."""
        if self._ipr is None:
            self._ipr = netns.netlink(self.namespace)
        return self._ipr

    def close(self) -> None:
        self.nl.close()
        if self._ipr is not None:
            self._ipr.close()

    def __enter__(self) -> NodeLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, what: str, kind: int, flags: int, body: bytes, fd: int | None = None) -> None:
        self.nl.queue(what, kind, flags, body, fd)
        if not self.batch:
            self.commit()

    def commit(self) -> None:
        """Send every queued change; the first refusal is raised, naming its object."""
        failed = self.nl.commit()
        if failed:
            what, code = failed[0]
            raise _kernel_error(what, self.namespace, code)

    # -- reading ---------------------------------------------------------
    def _dump_links(self, wanted: frozenset[int] | None = None) -> Iterator[tuple[int, dict[int, bytes], int]]:
        self.commit()
        for data in self.nl.dump_all(RTM_GETLINK, LINK_DUMP):
            _, _, index, flags, _ = _IFINFO.unpack_from(data, 16)
            yield index, _attrs(data, 16 + _IFINFO.size, wanted), flags

    def refresh(self, names: set[str] | None = None) -> dict[str, int]:
        """Learn interface indexes; one dump serves any ``names`` (cheaper than a request per name)."""
        self.index = {_cstr(attrs[IFLA_IFNAME]): index for index, attrs, _ in self._dump_links(_NAME_ONLY)}
        return self.index

    def ipv6_disabled(self) -> dict[str, bool]:
        """Each interface's ``disable_ipv6``, from the same dump that refreshes the indexes.

        Reading it here saves a /proc/sys open per interface on converge.
        """
        found: dict[str, bool] = {}
        self.index = {}
        for index, attrs, _ in self._dump_links(_NAME_AND_AF):
            name = _cstr(attrs[IFLA_IFNAME])
            self.index[name] = index
            conf = _attrs(_attrs(attrs.get(IFLA_AF_SPEC, b"")).get(socket.AF_INET6, b"")).get(IFLA_INET6_CONF, b"")
            if len(conf) >= 4 * (DEVCONF_DISABLE_IPV6 + 1):
                found[name] = bool(struct.unpack_from("=i", conf, 4 * DEVCONF_DISABLE_IPV6)[0])
        return found

    def links(self) -> dict[str, LinkInfo]:
        """One dump of every interface (and one of addresses); also refreshes the name -> index cache."""
        result = decode_links(list(self._dump_links(_SHOWN)))
        self.index = {name: info.index for name, info in result.items()}
        for name, addrs in self.addresses().items():
            if name in result:
                result[name].addresses = addrs
        return result

    def addresses(self) -> dict[str, list[str]]:
        self.commit()
        names = {index: name for name, index in self.index.items()}
        return decode_addresses(self.nl.dump_all(RTM_GETADDR, ADDRESS_DUMP), names)

    def route_to(self, address: str) -> tuple[str | None, str | None, str | None]:
        """(out interface, gateway, preferred source) this namespace's kernel picks for ``address``."""
        self.commit()
        family, packed = _ip_bytes(address)
        body = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + _attr(RTA_DST, packed)
        _, data, offset = self.nl.get(RTM_GETROUTE, body)
        attrs = _attrs(data, offset + _RTMSG.size)
        oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
        if oif is not None and oif not in self.index.values():
            self.refresh()
        names = {index: name for name, index in self.index.items()}
        return (
            names.get(oif) if oif is not None else None,
            _ip_text(family, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None,
            _ip_text(family, attrs[RTA_PREFSRC]) if RTA_PREFSRC in attrs else None,
        )

    def unsettled_ipv6(self) -> tuple[list[str], list[str]]:
        """(tentative, DAD-failed) IPv6 addresses as ``iface addr/len``.

        A tentative address cannot be a source or receive unicast (the stack
        drops what is sent to it): a lab is not up while one remains.
        """
        self.commit()
        names = {index: name for name, index in self.index.items()}
        tentative: list[str] = []
        failed: list[str] = []
        for _, data, offset in self.nl.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_INET6, 0, 0, 0, 0)):
            family, prefixlen, flags, _, index = _IFADDR.unpack_from(data, offset)
            if family != socket.AF_INET6:
                continue
            attrs = _attrs(data, offset + _IFADDR.size)
            if IFA_FLAGS in attrs:
                flags = struct.unpack("=I", attrs[IFA_FLAGS][:4])[0]
            address = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
            text = f"{names.get(index, str(index))} {_ip_text(family, address or bytes(16))}/{prefixlen}"
            if flags & IFA_F_DADFAILED:
                failed.append(text)
            elif flags & IFA_F_TENTATIVE:
                tentative.append(text)
        return tentative, failed

    def wait_ipv6_settled(self, timeout: float = 10.0) -> tuple[list[str], list[str]]:
        """Poll until no IPv6 address of a running interface is tentative; (still tentative, DAD failed).

        An interface that is down (``up: false``, a bridge without ports) never runs DAD, so its
        addresses stay tentative until it comes up: they are not waited for.
        """
        deadline = time.monotonic() + timeout
        while True:
            running = {
                _cstr(attrs[IFLA_IFNAME])
                for _, attrs, _ in self._dump_links(_NAME_AND_STATE)
                if OPERSTATES.get(attrs.get(IFLA_OPERSTATE, b"\0")[0]) in ("UP", "UNKNOWN")
            }
            tentative, failed = self.unsettled_ipv6()
            tentative = [entry for entry in tentative if entry.split(" ", 1)[0] in running]
            if not tentative or time.monotonic() > deadline:
                return tentative, failed
            time.sleep(0.05)

    def routes(self, own_only: bool = False) -> list[dict[str, Any]]:
        """Routes of the main table (IPv4 then IPv6), with interface names."""
        self.commit()
        names = {index: name for name, index in self.index.items()}
        # one dump of every family (the kernel walks them in order: IPv4, then IPv6)
        return decode_routes(self.nl.dump_all(RTM_GETROUTE, ROUTE_DUMP), names, own_only)

    def wait_operational(self, names: set[str], timeout: float = 2.0) -> list[str]:
        """Wait until ``names`` are operationally up; returns those that never were.

        A veth's queue drops everything until linkwatch has activated it, and
        operstate turns UP in the same step: polling it is what makes the very
        first frame of a check arrive (an ARP request otherwise vanishes).
        """
        deadline = time.monotonic() + timeout
        while True:
            pending = [
                _cstr(attrs[IFLA_IFNAME])
                for _, attrs, _ in self._dump_links(_NAME_AND_STATE)
                if _cstr(attrs[IFLA_IFNAME]) in names
                and OPERSTATES.get(attrs.get(IFLA_OPERSTATE, b"\0")[0]) not in ("UP", "UNKNOWN")
            ]
            if not pending or time.monotonic() > deadline:
                return pending
            time.sleep(0.005)

    def sync(self) -> None:
        """Return once the kernel's queued link work is done.

        operstate turns UP inside linkwatch just before the queues are
        activated, under RTNL: one request that takes RTNL (a qdisc dump does)
        waits for the rest.
        """
        self.commit()
        for _ in self.nl.dump(RTM_GETQDISC, struct.pack("=BxxxiIII", 0, 0, 0, 0, 0)):  # a tcmsg
            pass

    def port_vlans(self) -> dict[str, dict[int, str]]:
        """Each bridge port's VLANs: name -> vid -> "pvid untagged" / "untagged" / "tagged" (one raw dump).

        An AF_BRIDGE link dump asked for RTEXT_FILTER_BRVLAN lists, per port,
        one IFLA_BRIDGE_VLAN_INFO (struct bridge_vlan_info: flags, vid) per
        VLAN; a kernel without VLAN filtering lists none.
        """
        AF_BRIDGE, IFLA_EXT_MASK, RTEXT_FILTER_BRVLAN, IFLA_BRIDGE_VLAN_INFO = 7, 29, 2, 2
        self.commit()
        found: dict[str, dict[int, str]] = {}
        body = _IFINFO.pack(AF_BRIDGE, 0, 0, 0, 0) + _u32(IFLA_EXT_MASK, RTEXT_FILTER_BRVLAN)
        for _, data, offset in self.nl.dump(RTM_GETLINK, body):
            attrs = _attrs(data, offset + _IFINFO.size, frozenset({IFLA_IFNAME, IFLA_AF_SPEC}))
            if IFLA_IFNAME not in attrs or IFLA_AF_SPEC not in attrs:
                continue
            vlans = decode_vlan_infos(attrs[IFLA_AF_SPEC], IFLA_BRIDGE_VLAN_INFO)
            if vlans:
                found[_cstr(attrs[IFLA_IFNAME])] = vlans
        return found

    def static_fdb(self) -> list[dict[str, Any]]:
        """Static fdb entries of every bridge here (``bridge fdb add ... static [sticky]``), one raw dump.

        Learnt entries and the bridges' own permanent ones are left out: these
        are the entries a lab file asked for.
        """
        RTM_GETNEIGH, NDA_LLADDR, NDA_VLAN, NDA_MASTER = 30, 2, 5, 9
        NUD_NOARP, NUD_PERMANENT, NTF_STICKY, AF_BRIDGE = 0x40, 0x80, 0x40, 7
        self.commit()
        names = {index: name for name, index in self.index.items()}
        found = []
        for _, data, offset in self.nl.dump(RTM_GETNEIGH, struct.pack("=BxxxiHBB", AF_BRIDGE, 0, 0, 0, 0)):
            _, ifindex, state, flags, _ = struct.unpack_from("=BxxxiHBB", data, offset)
            if not state & NUD_NOARP or state & NUD_PERMANENT:
                continue
            attrs = _attrs(data, offset + 12)
            if NDA_MASTER not in attrs or NDA_LLADDR not in attrs:
                continue
            master = struct.unpack("=I", attrs[NDA_MASTER][:4])[0]
            found.append(
                {
                    "bridge": names.get(master, str(master)),
                    "mac": _mac(attrs[NDA_LLADDR]),
                    "port": names.get(ifindex, str(ifindex)),
                    "vlan": struct.unpack("=H", attrs[NDA_VLAN][:2])[0] if NDA_VLAN in attrs else None,
                    "sticky": bool(flags & NTF_STICKY),
                }
            )
        return found

    def learnt_macs(self, bridge: str) -> list[str]:
        """MACs the bridge learnt on its ports (the fdb minus permanent local entries)."""
        NUD_PERMANENT = 0x80
        found = []
        for msg in self.ipr.get_neighbours(family=7, master=self.index[bridge]):  # AF_BRIDGE
            if msg["state"] & NUD_PERMANENT:
                continue
            mac = msg.get("lladdr")
            if mac and mac not in found:
                found.append(mac)
        return found

    # -- creating --------------------------------------------------------
    def _link_attrs(self, attrs: LinkAttrs) -> tuple[int, int, bytes]:
        """(flags, change, attributes) of a link request."""
        parts = b""
        if attrs.mac:
            parts += _attr(IFLA_ADDRESS, bytes.fromhex(attrs.mac.replace(":", "")))
        if attrs.mtu:
            parts += _u32(IFLA_MTU, attrs.mtu)
        if attrs.txqueuelen is not None:
            parts += _u32(IFLA_TXQLEN, attrs.txqueuelen)
        if attrs.master:
            parts += _u32(IFLA_MASTER, self.index[attrs.master])
        elif attrs.detach:
            parts += _u32(IFLA_MASTER, 0)
        if attrs.alias is not None:
            parts += _text(IFLA_IFALIAS, attrs.alias)
        flags = (IFF_UP if attrs.up else 0) | (IFF_PROMISC if attrs.promisc else 0)
        return flags, IFF_UP | IFF_PROMISC, parts

    def add_bridge(
        self,
        name: str,
        attrs: LinkAttrs,
        *,
        stp: bool,
        ageing_time: float,
        forward_delay: float,
        index: int | None = None,
    ) -> None:
        """Create the bridge, or set its options if it exists; ``index`` as for :meth:`add_veth`."""
        options = _nested(
            IFLA_INFO_DATA,
            _u32(IFLA_BR_STP_STATE, 1 if stp else 0),
            _u32(IFLA_BR_AGEING_TIME, int(ageing_time * 100)),  # centiseconds
            _u32(IFLA_BR_FORWARD_DELAY, int(forward_delay * 100)),
        )
        flags, change, parts = self._link_attrs(attrs)
        linkinfo = _nested(IFLA_LINKINFO, _text(IFLA_INFO_KIND, "bridge"), options)
        if name in self.index:
            body = _IFINFO.pack(0, 0, self.index[name], flags, change) + parts + linkinfo
            self._send(f"bridge {name}", RTM_NEWLINK, 0, body)
            return
        body = _IFINFO.pack(0, 0, index or 0, flags, change) + _text(IFLA_IFNAME, name) + parts + linkinfo
        self._send(f"bridge {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
        if index:
            self.index[name] = index
        else:
            self.refresh()

    def add_veth(
        self,
        name: str,
        attrs: LinkAttrs,
        peer_name: str,
        peer_namespace: str,
        peer: LinkAttrs,
        index: int | None = None,
        peer_index: int | None = None,
    ) -> None:
        """Create a veth whose peer is born inside ``peer_namespace`` (never in the root one).

        The peer is born with its MAC, MTU and queue length, still down.
        With ``index``/``peer_index`` the ends get those ifindexes, so they
        are known without asking (each lookup would be a round trip).
        """
        peer_parts = _text(IFLA_IFNAME, peer_name)
        if peer.mac:
            peer_parts += _attr(IFLA_ADDRESS, bytes.fromhex(peer.mac.replace(":", "")))
        if peer.mtu:
            peer_parts += _u32(IFLA_MTU, peer.mtu)
        if peer.txqueuelen is not None:
            peer_parts += _u32(IFLA_TXQLEN, peer.txqueuelen)
        flags, change, parts = self._link_attrs(attrs)  # before the fd: a bad master raises here
        # the peer cannot come up in this request (veth_open refuses until the pair is joined)
        peer_info = _IFINFO.pack(0, 0, peer_index or 0, 0, 0)
        fd = os.open(netns.path(peer_namespace), os.O_RDONLY | os.O_CLOEXEC)  # closed once sent
        peer_parts += _u32(IFLA_NET_NS_FD, fd)
        linkinfo = _nested(
            IFLA_LINKINFO,
            _text(IFLA_INFO_KIND, "veth"),
            _nested(IFLA_INFO_DATA, _attr(VETH_INFO_PEER | NLA_F_NESTED, peer_info + peer_parts)),
        )
        body = _IFINFO.pack(0, 0, index or 0, flags, change) + _text(IFLA_IFNAME, name) + parts + linkinfo
        self._send(f"veth {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, fd)
        if index:
            self.index[name] = index

    def add_tap(self, name: str) -> None:
        """A persistent tap device; its frames go to whoever opens it (the VM relay)."""
        self.commit()
        with netns.entered(self.namespace):
            try:
                self.ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            except OSError as exc:
                raise _kernel_error(f"tap {name}", self.namespace, exc.errno or errno.EIO) from exc

    def configure(self, name: str, attrs: LinkAttrs) -> None:
        """Set attributes; by name when the index is not known (the kernel resolves it, no lookup)."""
        flags, change, parts = self._link_attrs(attrs)
        if name in self.index:
            body = _IFINFO.pack(0, 0, self.index[name], flags, change) + parts
        else:
            body = _IFINFO.pack(0, 0, 0, flags, change) + _text(IFLA_IFNAME, name) + parts
        self._send(f"interface {name}", RTM_NEWLINK, 0, body)

    def ensure_indexes(self, names: set[str]) -> None:
        """Learn the indexes of ``names`` that are not known yet (addresses and qdiscs need them)."""
        if not names <= self.index.keys():
            self.refresh()

    def delete(self, name: str) -> None:
        """Delete an interface; one already gone (a veth whose peer's namespace died) is fine."""
        self.commit()
        self.nl.queue(f"interface {name}", RTM_DELLINK, 0, _IFINFO.pack(0, 0, self.index.pop(name), 0, 0))
        for what, code in self.nl.commit():
            if code != errno.ENODEV:
                raise _kernel_error(what, self.namespace, code)

    # -- addresses and routes --------------------------------------------
    def _address(self, name: str, cidr: str) -> bytes:
        iface = ipaddress.ip_interface(cidr)
        family, packed = _ip_bytes(str(iface.ip))
        body = _IFADDR.pack(family, iface.network.prefixlen, 0, 0, self.index[name]) + _attr(IFA_ADDRESS, packed)
        return body + (_attr(IFA_LOCAL, packed) if family == socket.AF_INET else b"")

    def add_address(self, name: str, cidr: str) -> None:
        self._send(f"address {cidr} on {name}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, self._address(name, cidr))

    def del_address(self, name: str, cidr: str) -> None:
        self._send(f"address {cidr} on {name}", RTM_DELADDR, 0, self._address(name, cidr))

    @staticmethod
    def _route(dst: str, family: int = socket.AF_INET) -> bytes:
        """The rtmsg and destination of one of labctl's main-table routes ("default": of ``family``)."""
        if dst == "default":
            dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
        network = ipaddress.ip_network(dst)
        fam = socket.AF_INET if network.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(fam, network.prefixlen, 0, 0, ROUTE_TABLE_MAIN, RTPROT_LABCTL, 0, RTN_UNICAST, 0)
        body += _u32(RTA_TABLE, ROUTE_TABLE_MAIN)
        if network.prefixlen:
            body += _attr(RTA_DST, network.network_address.packed)
        return body

    def replace_route(self, dst: str, via: str | None, dev: str | None) -> None:
        body = self._route(dst)
        if via:
            body += _attr(RTA_GATEWAY, _ip_bytes(via)[1])
        if dev:
            body += _u32(RTA_OIF, self.index[dev])
        self._send(f"route {dst} via {via or dev}", RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)

    def delete_route(self, dst: str, family: int) -> None:
        self._send(f"route {dst}", RTM_DELROUTE, 0, self._route(dst, family))

    # -- offloads and queues -------------------------------------------------
    def set_features(self, name: str, wanted: dict[str, bool]) -> None:
        """ethtool -K by feature name (rx-gro, rx-gro-list, tx-tcp-segmentation...).

        GRO on a veth switches its receive side to NAPI (notes §1, claim R13).
        """
        self.commit()
        swap_features(self.namespace, name, wanted)

    def set_rps_cpus(self, name: str, mask: str) -> None:
        """RPS is configured in sysfs only, which must be mounted from inside the namespace."""
        from labctl.kernel.sysfs import write_in_namespace

        self.commit()
        write_in_namespace(self.namespace, f"class/net/{name}/queues/rx-0/rps_cpus", mask)


def feature_names() -> frozenset[str]:
    """The ethtool feature names this kernel knows (its netdev feature strings, the same for every device),
    read from ``lo`` of the calling thread's namespace -- a read, nothing changes.  Empty if unreadable."""
    from pyroute2 import Ethtool

    try:
        ethtool = Ethtool()
    except OSError:
        return frozenset()
    try:
        return frozenset(name for name in ethtool.get_features("lo").features if name)
    except OSError:
        return frozenset()
    finally:
        ethtool.close()


def swap_features(namespace: str, name: str, wanted: dict[str, bool], strict: bool = False) -> dict[str, bool]:
    """ethtool -K ``name`` in ``namespace``; returns the values the named features had (to put them back).

    A feature the device does not have is an error naming it; with ``strict``, so is one the driver did not
    change (fixed, or needing another feature first): the values are put back and the error names it.
    """
    from pyroute2 import Ethtool
    from pyroute2.ethtool.ioctl import EthtoolError

    with netns.entered(namespace):
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(name)
            unknown = sorted(set(wanted) - set(features.features))
            if unknown:
                raise OSError(f"{name} in {namespace} has no ethtool feature {', '.join(unknown)}")
            before = {feature: bool(features.features[feature].enable) for feature in wanted}
            for feature, enabled in wanted.items():
                features.features[feature].enable = enabled
            try:
                ethtool.set_features(name, features)
            except EthtoolError as exc:  # the kernel refused the request (a fixed feature): nothing to undo
                changing = sorted(f for f, on in wanted.items() if before[f] != on)
                raise OSError(
                    f"{name} in {namespace}: the driver did not change {', '.join(changing)} (fixed?)"
                ) from exc
            if not strict:
                return before
            after = ethtool.get_features(name)
            stuck = sorted(f for f, on in wanted.items() if bool(after.features[f].enable) != on)
            if stuck:
                ethtool.set_features(name, _with(after, before))
                raise OSError(f"{name} in {namespace}: the driver did not change {', '.join(stuck)} (fixed?)")
            return before
        finally:
            ethtool.close()


def _with(features: Any, values: dict[str, bool]) -> Any:
    for feature, enabled in values.items():
        features.features[feature].enable = enabled
    return features
