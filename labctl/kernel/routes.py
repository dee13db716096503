"""What a node's kernel answers to ``ip route get DST``: device, gateway, source and cached PMTU.

The lookup is an RTM_GETROUTE request sent from inside the node's namespace
(pyroute2), so it sees that node's tables and its route cache.  A learnt path
MTU (an ICMP frag-needed or packet-too-big that reached the node) lives in a
route exception that ``ip route get`` shows as ``cache ... mtu 1280``; the
kernel returns it as RTAX_MTU in RTA_METRICS, which is what ``mtu`` holds here.
No destination is ever resolved by name.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from typing import Any

from labctl.kernel import netns

RTN_NAMES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
             7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}


@dataclass(frozen=True)
class RouteAnswer:
    """One lookup's answer; ``error`` (an errno name such as ENETUNREACH) when there is no route."""

    dst: str
    type: str | None = None
    dev: str | None = None
    via: str | None = None
    src: str | None = None
    mtu: int | None = None
    """The route's MTU metric: a cached PMTU (or an MTU the route itself sets); None when it has none."""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def route_get(namespace: str, dst: str) -> RouteAnswer:
    """``ip route get dst`` in ``namespace``."""
    from pyroute2.netlink.exceptions import NetlinkError  # here: importing pyroute2 is 0.1 s of every trace

    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    ipr = netns.netlink(namespace)
    try:
        try:
            msg = ipr.route("get", dst=dst, family=family)[0]
        except NetlinkError as exc:
            import errno

            return RouteAnswer(dst, error=errno.errorcode.get(exc.code, str(exc.code)))
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    finally:
        ipr.close()
    metrics = msg.get_attr("RTA_METRICS")
    mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
    oif = msg.get_attr("RTA_OIF")
    return RouteAnswer(
        dst=dst,
        type=RTN_NAMES.get(msg["type"], str(msg["type"])),
        dev=names.get(oif) if oif is not None else None,
        via=msg.get_attr("RTA_GATEWAY"),
        src=msg.get_attr("RTA_PREFSRC"),
        mtu=int(mtu) if mtu else None,
    )
