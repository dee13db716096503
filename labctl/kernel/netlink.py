"""Netlink sockets, rtnetlink message formats and the attribute codec.

labctl encodes its netlink messages with ``struct`` rather than through
pyroute2: pyroute2 0.9 runs every request through an asyncio loop (about
1.4 ms a request, 1.2 ms to open a socket, 0.2 s to import), which made a
lab of a thousand nodes spend seconds in Python for milliseconds of kernel
work.  :class:`Netlink` queues requests and sends them in one write per
commit, then reads every acknowledgement; an error still names the object
it was about.  Every raw netlink reader and writer of the kernel layer
(links, addresses, routes, qdiscs, nf_tables tables) goes through here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator

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
NLA_F_NESTED = 0x8000
_NLA = struct.Struct("=HH")
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_BATCH_BYTES = 16384  # one write: at most a few hundred requests, whose acks fit in _RCVBUF
_RCVBUF = 1 << 21
SO_RCVBUFFORCE = 33
RTM_GETQDISC = 38


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
