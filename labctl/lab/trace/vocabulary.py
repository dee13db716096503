"""The notes' words for kernel functions and drop reasons, and the counters each stage shows."""

from __future__ import annotations

from labctl.lab.trace.model import Fate

_REASON_STAGE = {
    "CPU_BACKLOG": "backlog",
    "OTHERHOST": "ip_rcv",
    "PKT_TOO_SMALL": "ip_rcv",
    "IP_CSUM": "ip_rcv",
    "IP_INHDR": "ip_rcv",
    "IP_RPFILTER": "routing",
    "UNICAST_IN_L2_MULTICAST": "ip_rcv",
    "NETFILTER_DROP": "netfilter",
    "IP_INADDRERRORS": "routing",
    "IP_INNOROUTES": "routing",
    "IP_OUTNOROUTES": "routing",
    "NO_SOCKET": "L4",
    "UDP_CSUM": "L4",
    "SOCKET_RCVBUFF": "socket",
    "SOCKET_FILTER": "socket",
    "SOCKET_CLOSE": "socket",
    "PROTO_MEM": "socket",
    "QDISC_DROP": "qdisc",
}
"""Where on the path each drop reason stops a packet (the stage it is shown after)."""

_FUNCTION_STAGE = {
    "enqueue_to_backlog": "backlog",
    "ip_rcv": "ip_rcv",
    "ip_rcv_core": "ip_rcv",
    "ip_error": "routing",
    "ip_rcv_finish": "routing",
    "ip_rcv_finish_core": "routing",
    "nf_hook_slow": "netfilter",
    "__udp4_lib_rcv": "L4",
    "udp_rcv": "L4",
    "tcp_v4_rcv": "L4",
    "icmp_rcv": "L4",
    "udp_queue_rcv_one_skb": "socket",
    "__udp_enqueue_schedule_skb": "socket",
    "__dev_queue_xmit": "qdisc",
}

CONSUMERS: dict[str, tuple[Fate, str]] = {
    "skb_consume_udp": ("delivered", "read by the application (recvmsg)"),
    "__consume_stateless_skb": ("delivered", "read by the application (recvmsg)"),
    "udp_recvmsg": ("delivered", "read by the application (recvmsg)"),
    "skb_free_datagram": ("delivered", "read by the application (recvmsg)"),
    # 6.18 hands a read skb back to the CPU that allocated it (skb_attempt_defer_free, only
    # called by the sockets' receive paths); that CPU frees it at its next softirq
    "skb_defer_free_flush": ("delivered", "read by the application (recvmsg), freed later (deferred free)"),
    "napi_consume_skb": ("delivered", "read by the application (recvmsg), freed later (deferred free)"),
    "icmp_rcv": ("consumed", "handled by ICMP (icmp_rcv)"),
    "arp_process": ("consumed", "handled by ARP (arp_process)"),
    "arp_rcv": ("consumed", "handled by ARP (arp_rcv)"),
    "tun_do_read": ("relayed", "read from the tap by the VM relay (tun_do_read)"),
    "tun_put_user": ("relayed", "read from the tap by the VM relay"),
    "tpacket_rcv": ("consumed", "AF_PACKET copy freed (tpacket_rcv)"),
}
"""consume_skb locations → what the consumption means."""

LOCAL_FUNCTIONS = frozenset({"__udp4_lib_rcv", "udp_rcv", "tcp_v4_rcv", "icmp_rcv", "ip_local_deliver"})
LOCAL_FUNCTIONS |= frozenset({"udp_queue_rcv_one_skb", "__udp_enqueue_schedule_skb", "raw_rcv"})

STAGE_COUNTERS: dict[str, tuple[str, ...]] = {
    "ip_rcv": ("Ip.InReceives", "Ip.InHdrErrors", "Ip.InDiscards", "IpExt.InTruncatedPkts", "IpExt.InCsumErrors"),
    "routing:local": ("Ip.InDelivers",),
    "routing:forward": ("Ip.ForwDatagrams",),
    "routing:error": ("Ip.InAddrErrors", "IpExt.InNoRoutes"),
    "UDP": ("Udp.InDatagrams", "Udp.NoPorts", "Udp.InErrors", "Udp.InCsumErrors"),
    "TCP": ("Tcp.InSegs", "Tcp.InErrs", "Tcp.OutRsts"),
    "ICMP": ("Icmp.InMsgs", "Icmp.InErrors", "Icmp.InEchos", "Icmp.InDestUnreachs"),
    "socket": ("Udp.RcvbufErrors", "Udp.InErrors"),
}
"""Counters shown next to a stage when they moved (snmp/netstat names as ``Proto.Name``)."""

REASON_COUNTERS: dict[str, tuple[str, ...]] = {
    "NO_SOCKET": ("Udp.NoPorts", "Icmp.OutDestUnreachs"),
    "SOCKET_RCVBUFF": ("Udp.RcvbufErrors", "Udp.InErrors"),
    "SOCKET_FILTER": ("Udp.InErrors",),
    "IP_INADDRERRORS": ("Ip.InAddrErrors",),
    "IP_INNOROUTES": ("IpExt.InNoRoutes",),
    "OTHERHOST": (),
    "CPU_BACKLOG": (),
}


def drop_stage(reason: str | None, function: str | None) -> str | None:
    if reason and reason in _REASON_STAGE:
        return _REASON_STAGE[reason]
    if function and function in _FUNCTION_STAGE:
        return _FUNCTION_STAGE[function]
    if reason and reason.startswith("NEIGH_"):
        return "neighbour"
    return None
