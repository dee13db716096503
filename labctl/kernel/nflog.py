"""nfnetlink_log from inside a namespace: the socket, its configuration, and the packet messages decoded.

pyroute2 0.9.7 has no nfnetlink_log (NFULNL) message class, so the few
structures needed are packed and parsed here with :mod:`struct`.  The hook
tracer (:mod:`labctl.kernel.nftrace`) binds a group with
:func:`open_listener` and reads what its NFLOG rules log.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from labctl.kernel import netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

# config attributes / commands (linux/netfilter/nfnetlink_log.h)
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x1

# packet attributes
NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_SEQ = 12

COPY_RANGE = 64
"""Bytes of each packet copied into the trace: the IPv4 (or IPv6) + transport headers."""


class TraceError(RuntimeError):
    """The trace could not be set up (netlink refused, rules refused)."""


@dataclass(frozen=True)
class NflogMessage:
    """One nfnetlink_log packet message, decoded."""

    family: int
    hook: int
    prefix: str
    seq: int | None
    indev: int | None
    outdev: int | None
    physindev: int | None
    physoutdev: int | None
    mark: int
    timestamp: float | None
    payload: bytes


# --------------------------------------------------------------------------
# netlink plumbing


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _config_message(group: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Netlink attributes of one message body (type flags masked off)."""
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


def parse_packet(family: int, body: bytes) -> NflogMessage:
    """Decode the attributes of an NFULNL_MSG_PACKET (after the nfgenmsg)."""
    attrs = parse_attrs(body)

    def u32(kind: int) -> int | None:
        raw = attrs.get(kind)
        return struct.unpack("!I", raw[:4])[0] if raw else None

    hook = attrs[NFULA_PACKET_HDR][2] if NFULA_PACKET_HDR in attrs else -1
    stamp = None
    if NFULA_TIMESTAMP in attrs:
        sec, usec = struct.unpack("!QQ", attrs[NFULA_TIMESTAMP][:16])
        stamp = sec + usec / 1e6
    return NflogMessage(
        family=family,
        hook=hook,
        prefix=attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace"),
        seq=u32(NFULA_SEQ),
        indev=u32(NFULA_IFINDEX_INDEV),
        outdev=u32(NFULA_IFINDEX_OUTDEV),
        physindev=u32(NFULA_IFINDEX_PHYSINDEV),
        physoutdev=u32(NFULA_IFINDEX_PHYSOUTDEV),
        mark=u32(NFULA_MARK) or 0,
        timestamp=stamp,
        payload=attrs.get(NFULA_PAYLOAD, b""),
    )


def parse_datagram(data: bytes) -> tuple[list[NflogMessage], list[int]]:
    """Split one recv() into packet messages and netlink error codes (acks are 0)."""
    messages: list[NflogMessage] = []
    errors: list[int] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        body = data[offset + 16 : offset + length]
        if kind == NLMSG_ERROR:
            errors.append(-struct.unpack_from("=i", body)[0])
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            messages.append(parse_packet(body[0], body[4:]))
        offset += (length + 3) & ~3
    return messages, errors


NFLOG_QUIET_SECONDS = 0.02
"""How long :meth:`NflogListener.drain` waits for one more message.  A message is queued on our socket in
the packet's own context, as the packet passes the NFLOG rule (queue threshold 1, flush timeout 0: the
kernel sends each one at once), so once the traffic is over every message is already there; the wait only
covers a packet still being processed on the other CPU.  (It was 0.2 s: 0.4 s per traced check, 6 s of
the 57 s serial ``labctl run labs/``.)"""


class NflogListener:
    """An nfnetlink_log group bound from inside a namespace.

    The socket is created with the thread in the namespace, so it receives
    what NFLOG rules of *that* namespace log.  Messages are queued one per
    packet (queue threshold 1) and numbered (``NFULNL_CFG_F_SEQ``).
    """

    def __init__(self, namespace: str, group: int) -> None:
        self.namespace = namespace
        self.group = group
        self._seq = 0
        self._pending: list[NflogMessage] = []
        with netns.entered(namespace):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
            self.sock.bind((0, 0))
            self._configure()
        except Exception:
            self.sock.close()
            raise

    def _configure(self) -> None:
        self._request(_attr(NFULA_CFG_CMD, struct.pack("=Bxxx", NFULNL_CFG_CMD_BIND)))
        self._request(_attr(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET)))
        self._request(_attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1)))
        self._request(_attr(NFULA_CFG_TIMEOUT, struct.pack("!I", 0)))
        self._request(_attr(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)))

    def _request(self, attrs: bytes) -> None:
        """Send one config message and wait for its ack; OSError on refusal."""
        self._seq += 1
        self.sock.send(_config_message(self.group, attrs, self._seq))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            if not ready:
                break
            messages, errors = parse_datagram(self.sock.recv(1 << 16))
            self._pending.extend(messages)
            if errors:
                if errors[0]:
                    raise OSError(errors[0], f"nfnetlink_log group {self.group}: {os.strerror(errors[0])}")
                return
        raise TimeoutError(f"nfnetlink_log did not answer (group {self.group})")

    def drain(self, settle: float = NFLOG_QUIET_SECONDS, timeout: float = 5.0) -> list[NflogMessage]:
        """Everything received so far, waiting until ``settle`` seconds pass quietly (0: only what is there)."""
        messages, self._pending = self._pending, []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], settle)
            if not ready:
                break
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise TraceError("trace messages were lost (socket buffer overrun)") from exc
                raise
            messages.extend(parse_datagram(data)[0])
        return messages

    def close(self) -> None:
        try:
            self._request(_attr(NFULA_CFG_CMD, struct.pack("=Bxxx", NFULNL_CFG_CMD_UNBIND)))
        except OSError:
            pass
        finally:
            self.sock.close()


def open_listener(namespace: str, group: int | None = None) -> NflogListener:
    """Bind ``group``, or the first free group from a pid-derived start."""
    if group is not None:
        return NflogListener(namespace, group)
    start = 0x4C00 + (os.getpid() % 0x300)
    for candidate in range(start, start + 64):
        try:
            return NflogListener(namespace, candidate)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
    raise TraceError(f"no free nfnetlink_log group in {namespace}")
