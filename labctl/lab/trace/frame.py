"""The headers of an injected frame, parsed without Scapy."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP, ETH_P_ARP, ETH_P_ALL = 0x0800, 0x0806, 0x0003
IP_PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP"}


@dataclass(frozen=True)
class FrameInfo:
    """The headers of an injected frame that the analysis needs (parsed without Scapy)."""

    length: int
    ethertype: int
    src_ip: str | None = None
    dst_ip: str | None = None
    protocol: int | None = None
    dport: int | None = None

    @classmethod
    def parse(cls, frame: bytes) -> FrameInfo:
        if len(frame) < 14:
            return cls(len(frame), 0)
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        offset = 14
        if ethertype == 0x8100 and len(frame) >= 18:
            (ethertype,) = struct.unpack_from("!H", frame, 16)
            offset = 18
        if ethertype != ETH_P_IP or len(frame) < offset + 20:
            return cls(len(frame), ethertype)
        ihl = (frame[offset] & 0x0F) * 4
        protocol = frame[offset + 9]
        src = str(ipaddress.IPv4Address(frame[offset + 12 : offset + 16]))
        dst = str(ipaddress.IPv4Address(frame[offset + 16 : offset + 20]))
        dport = None
        if protocol in (6, 17) and len(frame) >= offset + ihl + 4:
            (dport,) = struct.unpack_from("!H", frame, offset + ihl + 2)
        return cls(len(frame), ethertype, src, dst, protocol, dport)

    @property
    def kind(self) -> str:
        if self.ethertype == ETH_P_IP:
            return "IPv4 " + IP_PROTOCOLS.get(self.protocol or -1, f"proto {self.protocol}")
        return ethertype_name(self.ethertype)


def ethertype_name(ethertype: int | None) -> str:
    return {ETH_P_IP: "IPv4", ETH_P_ARP: "ARP", 0x86DD: "IPv6"}.get(ethertype or -1, f"ethertype {ethertype:#06x}")
