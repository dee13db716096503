"""A namespace's main routing table: labctl's routes added, replaced and deleted, the table read, a route asked.

The route half of :class:`labctl.kernel.links.NodeLinks` (a mixin on its
netlink handle), and the decoder of a route dump that the readers of many
namespaces share.  labctl's routes carry their own protocol number, so a
converge only ever touches routes it made.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from labctl.kernel.netlink import (
    _RTMSG,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    RTM_DELROUTE,
    RTM_GETROUTE,
    RTM_NEWROUTE,
    _attr,
    _attrs,
    _ip_bytes,
    _ip_text,
    _u32,
)
from labctl.kernel.nodenetlink import NodeNetlink

RTPROT_LABCTL = 4  # "static": routes labctl added, so converge only touches its own
ROUTE_TABLE_MAIN = 254
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
RTN_UNICAST = 1
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


class NodeRoutes(NodeNetlink):
    """Routes of one namespace's main table, over its :class:`NodeNetlink`."""

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

    def routes(self, own_only: bool = False) -> list[dict[str, Any]]:
        """Routes of the main table (IPv4 then IPv6), with interface names."""
        self.commit()
        names = {index: name for name, index in self.index.items()}
        # one dump of every family (the kernel walks them in order: IPv4, then IPv6)
        return decode_routes(self.nl.dump_all(RTM_GETROUTE, ROUTE_DUMP), names, own_only)

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
