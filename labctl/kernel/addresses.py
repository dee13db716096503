"""A namespace's IP addresses: adding and removing them, reading them, and waiting for IPv6 DAD.

The address half of :class:`labctl.kernel.links.NodeLinks` (a mixin on
its netlink handle), and the decoder of an address dump that the readers
of many namespaces share.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

from labctl.kernel.linkinfo import _NAME_AND_STATE, OPERSTATES
from labctl.kernel.netlink import (
    _IFADDR,
    IFLA_IFNAME,
    IFLA_OPERSTATE,
    NLM_F_CREATE,
    NLM_F_EXCL,
    RTM_DELADDR,
    RTM_GETADDR,
    RTM_NEWADDR,
    _attr,
    _attrs,
    _cstr,
    _ip_bytes,
    _ip_text,
)
from labctl.kernel.nodenetlink import NodeNetlink

IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_FLAGS = 8  # u32: the full flags (ifa_flags in the header holds only the low 8 bits)
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
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


class NodeAddresses(NodeNetlink):
    """Addresses of one namespace's interfaces, over its :class:`NodeNetlink`."""

    def addresses(self) -> dict[str, list[str]]:
        self.commit()
        names = {index: name for name, index in self.index.items()}
        return decode_addresses(self.nl.dump_all(RTM_GETADDR, ADDRESS_DUMP), names)

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

    def _address(self, name: str, cidr: str) -> bytes:
        iface = ipaddress.ip_interface(cidr)
        family, packed = _ip_bytes(str(iface.ip))
        body = _IFADDR.pack(family, iface.network.prefixlen, 0, 0, self.index[name]) + _attr(IFA_ADDRESS, packed)
        return body + (_attr(IFA_LOCAL, packed) if family == socket.AF_INET else b"")

    def add_address(self, name: str, cidr: str) -> None:
        self._send(f"address {cidr} on {name}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, self._address(name, cidr))

    def del_address(self, name: str, cidr: str) -> None:
        self._send(f"address {cidr} on {name}", RTM_DELADDR, 0, self._address(name, cidr))
