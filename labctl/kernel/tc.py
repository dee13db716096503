"""Traffic control of one interface, made with pyroute2 inside the node's namespace.

What is built, in kernel terms (the numbers are already parsed by the model):

* the root qdisc has handle ``1:``; htb classes are ``1:N`` under it;
* ``clsact`` (parent ``ffff:fff1``) gives the ingress hook ``ffff:fff2`` and
  the egress hook ``ffff:fff3``; ``ingress`` is the older qdisc ``ffff:``;
* a ``bpf`` filter is classic BPF compiled by libpcap from a tcpdump
  expression, loaded with ``TCA_BPF_OPS`` in direct-action mode: each
  ``ret`` of the program is rewritten to the tc verdict -- a match returns
  ``TC_ACT_SHOT`` (drop) or ``TC_ACT_OK`` (pass), anything else
  ``TC_ACT_UNSPEC`` (the next filter decides).  No action module is needed,
  which matters on kernels without gact.  pyroute2 declares ``TCA_BPF_OPS``
  as one u32, so this request is encoded here.
* u32 and matchall act through pyroute2's gact (drop/pass) and mirred actions.

A converge removes the interface's qdiscs (which takes their classes and
filters with them) and builds them again: the kernel replaces nothing across
kinds, and a tc tree is a handful of requests.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
CLSACT_INGRESS = 0xFFFFFFF2
CLSACT_EGRESS = 0xFFFFFFF3
INGRESS_HANDLE = 0xFFFF0000
ROOT_HANDLE = 0x10000
ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC = 0, 2, 0xFFFFFFFF
TCA_BPF_FLAG_ACT_DIRECT = 1
RTM_NEWTFILTER = 44
# attributes (linux/rtnetlink.h, linux/pkt_cls.h)
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_OPS_LEN, TCA_BPF_OPS, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 4, 5, 7, 8
BPF_RET_K = 0x06
_PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17}


class TcError(RuntimeError):
    """The kernel refused a qdisc, class or filter; the message names it."""


@dataclass
class FilterPlan:
    kind: str
    parent: int
    prio: int
    protocol: int
    params: dict[str, Any] = field(default_factory=dict)
    bpf: list[tuple[int, int, int, int]] | None = None
    bpf_name: str = ""
    classid: int | None = None
    what: str = ""


@dataclass
class TcPlan:
    """Everything one interface gets, in the order it is created."""

    qdisc: tuple[str, dict[str, Any]] | None = None
    classes: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    hook: str | None = None  # "clsact" | "ingress"
    filters: list[FilterPlan] = field(default_factory=list)


def u32_keys(protocol: str | None, src: str | None, dst: str | None, sport: int | None, dport: int | None) -> list[str]:
    """pyroute2's u32 keys ("value/mask+offset", offsets from the IPv4 header) for an IPv4 match."""
    import ipaddress

    keys = []
    if protocol is not None:
        keys.append(f"0x{_PROTOCOLS[protocol] << 16:08x}/0x00ff0000+8")
    for address, offset in ((src, 12), (dst, 16)):
        if address is not None:
            net = ipaddress.ip_network(address if "/" in address else f"{address}/32")
            keys.append(f"0x{int(net.network_address):08x}/0x{int(net.netmask):08x}+{offset}")
    if sport is not None or dport is not None:
        # transport ports right after a 20-byte header (u32 'nexthdr' needs a hash table; labs send no IP options)
        value = ((sport or 0) << 16) | (dport or 0)
        mask = (0xFFFF0000 if sport is not None else 0) | (0xFFFF if dport is not None else 0)
        keys.append(f"0x{value:08x}/0x{mask:08x}+20")
    return keys or ["0x0/0x0+0"]


def bpf_program(expr: str, verdict: int | None) -> list[tuple[int, int, int, int]]:
    """libpcap's program for ``expr`` with its returns turned into tc verdicts (or kept, for a classid)."""
    from labctl.kernel.bpf import compile_filter

    program = compile_filter(expr)
    if verdict is None:
        return program
    return [
        (code, jt, jf, (verdict if k else TC_ACT_UNSPEC) if code == BPF_RET_K else k) for code, jt, jf, k in program
    ]


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _bpf_request(index: int, flt: FilterPlan) -> bytes:
    assert flt.bpf is not None
    ops = b"".join(struct.pack("=HBBI", *insn) for insn in flt.bpf)
    options = _attr(TCA_BPF_OPS_LEN, struct.pack("=H", len(flt.bpf))) + _attr(TCA_BPF_OPS, ops)
    options += _attr(TCA_BPF_NAME, flt.bpf_name.encode()[:200] + b"\0")
    if flt.classid is not None:
        options += _attr(TCA_BPF_CLASSID, struct.pack("=I", flt.classid))
    else:
        options += _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT))
    info = (flt.prio << 16) | socket.htons(flt.protocol)
    tcmsg = struct.pack("=BxxxiIII", socket.AF_UNSPEC, index, 0, flt.parent, info)
    return tcmsg + _attr(TCA_KIND, b"bpf\0") + _attr(TCA_OPTIONS | 0x8000, options)


def clear(ipr: Any, index: int) -> None:
    """Remove the interface's root qdisc and ingress/clsact (their classes and filters go with them)."""
    from pyroute2.netlink.exceptions import NetlinkError

    for parent, handle in ((TC_H_ROOT, 0), (TC_H_INGRESS, INGRESS_HANDLE)):
        with contextlib.suppress(NetlinkError):  # nothing there: ENOENT / EINVAL
            ipr.tc("del", index=index, parent=parent, handle=handle)


def build(ipr: Any, namespace: str, ifname: str, index: int, plan: TcPlan) -> None:
    """Create ``plan`` on interface ``index`` (after :func:`clear`)."""
    from pyroute2.netlink.exceptions import NetlinkError

    from labctl.kernel import tc_flower

    tc_flower.register()  # flower, and netem's rate (pyroute2 0.9.7 lacks both)

    def refused(what: str, exc: NetlinkError) -> TcError:
        import os

        return TcError(f"{what} on {ifname} in {namespace}: {os.strerror(exc.code)}")

    if plan.qdisc is not None:
        kind, params = plan.qdisc
        try:
            ipr.tc("add", kind, index, ROOT_HANDLE, parent=TC_H_ROOT, **params)
        except NetlinkError as exc:
            raise refused(f"{kind} qdisc", exc) from exc
    for classid, params in plan.classes:
        try:
            ipr.tc("add-class", "htb", index, classid, parent=ROOT_HANDLE, **params)
        except NetlinkError as exc:
            raise refused(f"htb class {classid >> 16:x}:{classid & 0xFFFF:x}", exc) from exc
    if plan.hook is not None:
        try:
            ipr.tc("add", plan.hook, index, INGRESS_HANDLE, parent=TC_H_INGRESS)
        except NetlinkError as exc:
            raise refused(f"{plan.hook} qdisc", exc) from exc
    for flt in plan.filters:
        try:
            if flt.bpf is not None:
                _send_bpf(index, flt)
            else:
                ipr.tc(
                    "add-filter", flt.kind, index, 0, parent=flt.parent, prio=flt.prio, protocol=flt.protocol,
                    **flt.params,
                )  # fmt: skip
        except NetlinkError as exc:
            raise refused(flt.what, exc) from exc


def _send_bpf(index: int, flt: FilterPlan) -> None:
    """RTM_NEWTFILTER for a classic-BPF cls_bpf filter (the calling thread is in the node's namespace)."""
    from pyroute2.netlink.exceptions import NetlinkError

    from labctl.kernel.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST

    body = _bpf_request(index, flt)
    seq = 0x7C000000 | (index & 0xFFFF)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.bind((0, 0))
        sock.sendto(struct.pack("=IHHII", 16 + len(body), RTM_NEWTFILTER, flags, seq, 0) + body, (0, 0))
        while True:
            data = sock.recv(65536)
            _length, kind, _, got, _ = struct.unpack_from("=IHHII", data)
            if kind == 2 and got == seq:  # NLMSG_ERROR (0 is the ack)
                code = -struct.unpack_from("=i", data, 16)[0]
                if code:
                    raise NetlinkError(code)
                return
    finally:
        sock.close()


def root_kind(ipr: Any, index: int) -> tuple[str | None, str | None]:
    """(root qdisc kind if labctl's handle 1:, ingress-side qdisc kind) of the interface, as the kernel has them."""
    root = hook = None
    for msg in ipr.get_qdiscs(index=index):
        if msg["index"] != index:
            continue
        kind = msg.get_attr("TCA_KIND")
        if msg["parent"] == TC_H_ROOT and msg["handle"] == ROOT_HANDLE:
            root = kind
        elif msg["parent"] == TC_H_INGRESS:
            hook = kind
    return root, hook
