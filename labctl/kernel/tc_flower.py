"""A pyroute2 tc plugin for the flower classifier (pyroute2 0.9.7 has none).

Registered in pyroute2's plugin table on first use (:func:`register`), so
``ipr.tc("add-filter", "flower", ...)`` encodes ``TCA_OPTIONS`` like
``tc filter add ... flower ip_proto udp dst_ip 10.0.0.2 dst_port 5000 action
drop`` does: the ethertype from the protocol, the IPv4 keys with their masks,
the transport ports, and the actions through pyroute2's own action encoder.
Attribute numbers are linux/pkt_cls.h's ``TCA_FLOWER_*``.
"""

from __future__ import annotations

import ipaddress
import sys
from socket import htons
from typing import Any

from pyroute2.netlink import nla
from pyroute2.netlink.rtnl.tcmsg import plugins
from pyroute2.netlink.rtnl.tcmsg.common_act import get_tca_action, tca_act_prio

ETH_P_IP = 0x0800
IP_PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17}


def fix_request(request: dict[str, Any]) -> None:
    request["info"] = htons(request.get("protocol", ETH_P_IP) & 0xFFFF) | ((request.get("prio", 0) << 16) & 0xFFFF0000)


def get_parameters(kwarg: dict[str, Any]) -> dict[str, Any]:
    attrs: list[list[Any]] = []
    if kwarg.get("classid") is not None:
        attrs.append(["TCA_FLOWER_CLASSID", kwarg["classid"]])
    attrs.append(["TCA_FLOWER_KEY_ETH_TYPE", kwarg.get("protocol", ETH_P_IP)])
    protocol = kwarg.get("ip_proto")
    if protocol is not None:
        attrs.append(["TCA_FLOWER_KEY_IP_PROTO", IP_PROTOCOLS[protocol]])
    for key in ("src", "dst"):
        if kwarg.get(key) is not None:
            net = ipaddress.ip_network(kwarg[key] if "/" in kwarg[key] else f"{kwarg[key]}/32")
            name = key.upper()
            attrs.append([f"TCA_FLOWER_KEY_IPV4_{name}", str(net.network_address)])
            attrs.append([f"TCA_FLOWER_KEY_IPV4_{name}_MASK", str(net.netmask)])
    for key in ("sport", "dport"):
        if kwarg.get(key) is not None:
            side = "SRC" if key == "sport" else "DST"
            attrs.append([f"TCA_FLOWER_KEY_{str(protocol).upper()}_{side}", kwarg[key]])
    attrs.append(["TCA_FLOWER_FLAGS", 0])
    if kwarg.get("action"):
        attrs.append(["TCA_FLOWER_ACT", get_tca_action(kwarg)])
    return {"attrs": attrs}


class options(nla):  # pyroute2 looks the plugin's nla class up by this name
    nla_map = (
        ("TCA_FLOWER_UNSPEC", "none"),
        ("TCA_FLOWER_CLASSID", "uint32"),
        ("TCA_FLOWER_INDEV", "asciiz"),
        ("TCA_FLOWER_ACT", "tca_act_prio"),
        ("TCA_FLOWER_KEY_ETH_DST", "hex"),
        ("TCA_FLOWER_KEY_ETH_DST_MASK", "hex"),
        ("TCA_FLOWER_KEY_ETH_SRC", "hex"),
        ("TCA_FLOWER_KEY_ETH_SRC_MASK", "hex"),
        ("TCA_FLOWER_KEY_ETH_TYPE", "be16"),
        ("TCA_FLOWER_KEY_IP_PROTO", "uint8"),
        ("TCA_FLOWER_KEY_IPV4_SRC", "ip4addr"),
        ("TCA_FLOWER_KEY_IPV4_SRC_MASK", "ip4addr"),
        ("TCA_FLOWER_KEY_IPV4_DST", "ip4addr"),
        ("TCA_FLOWER_KEY_IPV4_DST_MASK", "ip4addr"),
        ("TCA_FLOWER_KEY_IPV6_SRC", "hex"),
        ("TCA_FLOWER_KEY_IPV6_SRC_MASK", "hex"),
        ("TCA_FLOWER_KEY_IPV6_DST", "hex"),
        ("TCA_FLOWER_KEY_IPV6_DST_MASK", "hex"),
        ("TCA_FLOWER_KEY_TCP_SRC", "be16"),
        ("TCA_FLOWER_KEY_TCP_DST", "be16"),
        ("TCA_FLOWER_KEY_UDP_SRC", "be16"),
        ("TCA_FLOWER_KEY_UDP_DST", "be16"),
        ("TCA_FLOWER_FLAGS", "uint32"),
    )

    tca_act_prio = tca_act_prio


def _netem_fix_request(request: dict[str, Any]) -> None:
    """netem's ``rate`` belongs in TCA_NETEM_RATE only; pyroute2 would also send it as TCA_RATE (and fail)."""
    request.pop("rate", None)


def register() -> None:
    """Make ``flower`` a kind pyroute2 can encode, and let netem take a rate (idempotent).

    pyroute2 0.9.7's netem plugin has no ``fix_request``, so a ``rate`` stays in
    the request as the generic TCA_RATE attribute and encoding fails.
    """
    plugins.setdefault("flower", sys.modules[__name__])
    netem = plugins["netem"]
    if not hasattr(netem, "fix_request"):
        netem.fix_request = _netem_fix_request
