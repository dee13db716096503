"""Interfaces of one namespace, over one netlink socket: :class:`NodeLinks`.

One :class:`NodeLinks` per namespace holds a single rtnetlink socket opened
inside it, so a whole node is configured without a helper process and with
as few round trips as the kernel allows: a veth is created with both ends
already in their namespaces (nothing ever appears in the root namespace),
with index, master, MTU, MAC and state of *both* ends in the same request.

A handle made with ``batch=True`` queues its changes and sends them in one
write per :meth:`NodeLinks.commit` (:mod:`labctl.kernel.netlink` says why
raw netlink, not pyroute2).  This module creates, configures and deletes
links and reads their state; the rest of a node's handle is in the mixins
it is made of: :mod:`~labctl.kernel.addresses`, :mod:`~labctl.kernel.routetable`,
:mod:`~labctl.kernel.bridgeports`, :mod:`~labctl.kernel.offloads`, on the
socket and index cache of :mod:`~labctl.kernel.nodenetlink`.  pyroute2 stays
for what is rare and intricate (ethtool features, qdiscs, tap devices),
opened on first use through :attr:`NodeLinks.ipr`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass

from labctl.kernel import netns
from labctl.kernel.addresses import NodeAddresses
from labctl.kernel.bridgeports import NodeBridgePorts
from labctl.kernel.linkinfo import (
    _NAME_AND_AF,
    _NAME_AND_STATE,
    _SHOWN,
    IFF_PROMISC,
    IFF_UP,
    OPERSTATES,
    LinkInfo,
    decode_links,
)
from labctl.kernel.netlink import (
    _IFINFO,
    DEVCONF_DISABLE_IPV6,
    IFLA_ADDRESS,
    IFLA_AF_SPEC,
    IFLA_IFALIAS,
    IFLA_IFNAME,
    IFLA_INET6_CONF,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MASTER,
    IFLA_MTU,
    IFLA_NET_NS_FD,
    IFLA_OPERSTATE,
    IFLA_TXQLEN,
    NLA_F_NESTED,
    NLM_F_CREATE,
    NLM_F_EXCL,
    RTM_DELLINK,
    RTM_GETQDISC,
    RTM_NEWLINK,
    _attr,
    _attrs,
    _cstr,
    _kernel_error,
    _nested,
    _text,
    _u32,
)
from labctl.kernel.offloads import NodeOffloads
from labctl.kernel.routetable import NodeRoutes

PEER_ALIAS = "labctl peer "
"""Prefix of the ifalias labctl gives each link end; the far end's ``node:interface`` follows."""
VETH_INFO_PEER = 1
IFLA_BR_FORWARD_DELAY, IFLA_BR_AGEING_TIME, IFLA_BR_STP_STATE = 1, 4, 5


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


class NodeLinks(NodeAddresses, NodeRoutes, NodeBridgePorts, NodeOffloads):
    """Netlink access to one namespace's interfaces, addresses, routes and bridge ports; one per node, reused.

    Batching and the index cache are :class:`~labctl.kernel.nodenetlink.NodeNetlink`'s;
    each mixin holds one kind of object, so every caller still needs only this handle.
    """

    def __enter__(self) -> NodeLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------
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

    def wait_operational(self, names: set[str], timeout: float = 2.0) -> list[str]:
        """Wait until ``names`` are operationally up; returns those that never were.

        A veth's queue drops everything until linkwatch has activated it, and
        operstate turns UP in the same step: polling it is what makes the very
        first frame of a check arrive (an ARP request otherwise vanishes).
        The last dump also refreshes the name -> index cache (a converge compares
        it with what it found before, see :func:`labctl.lab.namespaces.ipv6_after_converge`).
        """
        deadline = time.monotonic() + timeout
        while True:
            index: dict[str, int] = {}
            pending = []
            for number, attrs, _ in self._dump_links(_NAME_AND_STATE):
                name = _cstr(attrs[IFLA_IFNAME])
                index[name] = number
                if name in names and OPERSTATES.get(attrs.get(IFLA_OPERSTATE, b"\0")[0]) not in ("UP", "UNKNOWN"):
                    pending.append(name)
            self.index = index
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

    def delete(self, name: str) -> None:
        """Delete an interface; one already gone (a veth whose peer's namespace died) is fine."""
        self.commit()
        self.nl.queue(f"interface {name}", RTM_DELLINK, 0, _IFINFO.pack(0, 0, self.index.pop(name), 0, 0))
        for what, code in self.nl.commit():
            if code != errno.ENODEV:
                raise _kernel_error(what, self.namespace, code)
