"""The packet ``labctl hooks`` injects, made recognisable at every hook of every node.

IPv4: a random IP ID; IPv6: a random flow label (it has no ID); both: a
random source port or echo id, so conntrack sees a new flow and the nat
chains run.  The trace rules are limited to the packet's protocol.
"""

from __future__ import annotations

import random
from typing import Any


def tag_frame(frame: bytes, expr: str) -> tuple[bytes, int | None, int | None]:
    """Make the packet recognisable and a new flow, unless the user fixed those fields.

    * a random IP ID: NAT rewrites addresses and ports but never the ID, so
      the ID singles out the traced packet at every hook of every node (ICMP
      errors and replies it provokes carry their own IDs);
    * a random source port (UDP/TCP) or echo id (ICMP): conntrack keys flows
      by them, and nat chains run only for a flow's first packet, so a second
      trace with Scapy's fixed defaults (sport 53) would silently skip nat.

    IPv6 has no ID: a random flow label (forwarding and NAT leave it alone)
    marks the packet instead, and an echo request gets a random id.

    Returns the frame, the IP ID to follow and the IPv6 flow label to follow
    (each None when the frame is not of that family).
    """
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    from labctl.traffic.expr import parse_packet

    pkt = Ether(frame)
    network = IP if IP in pkt else IPv6 if IPv6 in pkt else None
    if network is None:
        return frame, None, None
    written = parse_packet(expr)
    rng = random.SystemRandom()

    def unset(layer: type[Any], name: str) -> bool:
        return layer in pkt and (layer not in written or name not in written[layer].fields)

    if network is IP and unset(IP, "id"):
        pkt[IP].id = rng.randint(0x1000, 0xFFFF)
    if network is IPv6 and unset(IPv6, "fl"):
        pkt[IPv6].fl = rng.randint(0x10000, 0xFFFFF)
    for layer, name in ((UDP, "sport"), (TCP, "sport"), (ICMP, "id"), (ICMPv6EchoRequest, "id")):
        if unset(layer, name):
            setattr(pkt[layer], name, rng.randint(20000, 60999))
    if network is IP:
        del pkt[IP].chksum
    for layer in (UDP, TCP, ICMP, ICMPv6EchoRequest):
        if layer in pkt:
            delattr(pkt[layer], "cksum" if layer is ICMPv6EchoRequest else "chksum")
    if network is IPv6:
        return bytes(pkt), None, int(pkt[IPv6].fl)
    return bytes(pkt), int(pkt[IP].id), None


def summary(frame: bytes) -> str:
    from scapy.layers.l2 import Ether

    return str(Ether(frame).summary())


def protocol_match(frame: bytes) -> str:
    """iptables words limiting the trace rules to the packet's protocol (NAT may change ports).

    For an IPv6 frame ``-p icmp`` is what the tracer turns into ip6tables'
    echo-request match (:func:`labctl.kernel.nftrace.ip6_match`).
    """
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    pkt = Ether(frame)
    if IPv6 in pkt:
        for layer6, name in ((UDP, "udp"), (TCP, "tcp"), (ICMPv6EchoRequest, "icmp")):
            if layer6 in pkt:
                return f"-p {name}"
        return ""
    if IP not in pkt:
        return ""
    for layer, name in ((UDP, "udp"), (TCP, "tcp"), (ICMP, "icmp")):
        if layer in pkt:
            return f"-p {name}"
    return ""
