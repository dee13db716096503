"""A node's own UDP sockets: the end points of the receive and send paths.

Frames injected with AF_PACKET skip the sender's stack; the experiments about
the socket layer need real sockets owned by the node's namespace:

* :class:`UdpListener` is the receiving application.  Its knobs are the
  kernel's drop points at the end of the receive path: ``socket_filter``
  (``sk_filter`` -> SKB_DROP_REASON_SOCKET_FILTER), ``rcvbuf`` with
  ``read=False`` (a full receive queue -> SOCKET_RCVBUFF), and a reader
  thread that empties the queue like ``recvfrom`` in a real server.
* :func:`send_udp` is the sending application: its datagrams go through
  OUTPUT, routing, POSTROUTING, the neighbour layer and the qdisc, and the
  errno it gets back (EPERM from a netfilter DROP, ENETUNREACH without a
  route) is part of the evidence, so it is returned, not raised.
"""

from __future__ import annotations

import errno as errno_codes
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Self

from labctl.kernel import netns
from labctl.kernel.bpf import DLT_RAW, SockFilter, attach_filter, compile_filter

SO_RCVBUFFORCE = 33
SOL_UDP, UDP_SEGMENT = 17, 103  # <linux/udp.h>: one send of N*gso_size bytes leaves as N datagrams
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2  # <linux/in.h>: DF never / always set
IPV6_DONTFRAG = 62  # <linux/in6.h>: a datagram over the path MTU is refused (EMSGSIZE), not fragmented
SO_MEMINFO = 55
SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_RCVBUF, SK_MEMINFO_DROPS = 0, 1, 8
SK_MEMINFO_VARS = 9

DROP_ALL = "drop-all"
_RET_ZERO: list[SockFilter] = [(0x06, 0, 0, 0)]  # BPF_RET|BPF_K 0: keep 0 bytes = drop

# classic BPF opcode fields (<linux/bpf_common.h>)
_BPF_LD, _BPF_LDX = 0x00, 0x01
_BPF_ABS, _BPF_IND, _BPF_LEN, _BPF_MSH = 0x20, 0x40, 0x80, 0xA0
_SKF_NET_OFF = -0x100000


class SocketFilterError(ValueError):
    """A tcpdump expression cannot be used as a UDP socket filter."""


def udp_socket_filter(expr: str) -> list[SockFilter]:
    """BPF for a UDP socket from tcpdump syntax (``'drop-all'`` = reject everything).

    When a UDP socket runs its filter the skb data starts at the UDP header,
    not at a link-layer header.  libpcap compiles for raw IP (DLT_RAW, offset
    0 = IP header) and every packet load is then rebased onto the network
    header with the kernel's ``SKF_NET_OFF`` window, so ``src host``, ``udp
    port``... mean what they mean in tcpdump.  Length tests (``greater``,
    ``len``) would see the UDP length and are refused.
    """
    if expr == DROP_ALL:
        return list(_RET_ZERO)
    return [_from_network_header(insn, expr) for insn in compile_filter(expr, linktype=DLT_RAW)]


def _from_network_header(insn: SockFilter, expr: str) -> SockFilter:
    code, jt, jf, k = insn
    cls, mode = code & 0x07, code & 0xE0
    if cls in (_BPF_LD, _BPF_LDX) and mode == _BPF_LEN:
        raise SocketFilterError(f"socket filter {expr!r}: packet-length tests are not supported")
    is_packet_load = (cls == _BPF_LD and mode in (_BPF_ABS, _BPF_IND)) or (cls == _BPF_LDX and mode == _BPF_MSH)
    if is_packet_load and k < 0x80000000:  # leave ancillary (negative) offsets alone
        k = (k + _SKF_NET_OFF) & 0xFFFFFFFF
    return code, jt, jf, k


# ---------------------------------------------------------------- listener


def family_of(address: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, AF_INET otherwise: a socket's family follows the address it is given."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def sk_meminfo(sock: socket.socket) -> tuple[int, ...]:
    """The socket's SO_MEMINFO counters, indexed by the ``SK_MEMINFO_*`` constants."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    return struct.unpack(f"{len(raw) // 4}I", raw)


def wait_until(done: Callable[[], bool], timeout: float, interval: float) -> bool:
    """Poll ``done`` every ``interval`` seconds until it holds (True) or ``timeout`` passed (its last answer)."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(interval)
    return done()


@dataclass
class SocketListener:
    """A socket bound in ``namespace`` and served by a poll thread until :meth:`close`: the lifecycle
    :class:`UdpListener` and :class:`labctl.kernel.tcp.TcpListener` share.

    A subclass names its socket type (``kind``) and the thread's name prefix, sets the socket up before
    it is served (``_prepare``: options, filter, ``bind``, ``listen``; a failure closes the socket), says
    whether to serve it at all (``_serving``) and handles what ``poll`` reports (``_on_events``).  A wake
    pipe ends the thread's ``poll`` on close, and the thread handles that last wake-up like any other, so
    what is queued when :meth:`close` is called is still taken.
    """

    kind: ClassVar[socket.SocketKind]
    thread_prefix: ClassVar[str]

    namespace: str
    port: int
    addr: str = "0.0.0.0"
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        with netns.entered(self.namespace):
            self._sock = socket.socket(family_of(self.addr), self.kind)
        try:
            self._prepare()
        except BaseException:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        self._closing = threading.Event()
        if self._serving():
            name = f"{self.thread_prefix}-{self.port}"
            self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
            self._thread.start()

    def _prepare(self) -> None:
        """Set the new socket up (options, bind, listen) before it is served."""
        raise NotImplementedError

    def _serving(self) -> bool:
        """Whether a thread serves the socket (False: what arrives stays queued in the kernel)."""
        return True

    def _on_events(self, poller: select.poll, events: list[tuple[int, int]]) -> None:
        """Handle one ``poll`` wake-up (the socket's, a connection's or the wake pipe's)."""
        raise NotImplementedError

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closing.is_set():
            self._on_events(poller, poller.poll())

    def _release(self) -> None:
        """Close what the thread opened besides the socket (after the thread ended)."""

    def close(self) -> None:
        """Stop the thread (it handles what is queued first) and close the socket."""
        if self._sock.fileno() < 0:
            return
        self._closing.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        self._release()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ListenerStats:
    """The socket's own view (SO_MEMINFO): what waits in its queue and what it dropped."""

    queued_bytes: int
    rcvbuf: int
    drops: int
    received: int


Datagram = tuple[bytes, tuple[str, int]]


@dataclass
class UdpListener(SocketListener):
    """A UDP socket bound in ``namespace``; reads in a background thread unless ``read=False``.

    ``rcvbuf`` is forced with SO_RCVBUFFORCE (the kernel doubles it and keeps
    a floor of ~2.3 KB, so 1 gives the smallest queue: a datagram or two).
    The filter is attached before ``bind`` so no datagram escapes it.
    """

    kind: ClassVar[socket.SocketKind] = socket.SOCK_DGRAM
    thread_prefix: ClassVar[str] = "udp"

    rcvbuf: int | None = None
    read: bool = True
    socket_filter: str | None = None
    _received: list[Datagram] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        # compiled before the socket exists: a bad expression creates nothing
        self._program = udp_socket_filter(self.socket_filter) if self.socket_filter else None
        super().__post_init__()

    def _prepare(self) -> None:
        if self.rcvbuf is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        if self._program is not None:
            attach_filter(self._sock, self._program)
        self._sock.bind((self.addr, self.port))

    def _serving(self) -> bool:
        return self.read

    def _on_events(self, poller: select.poll, events: list[tuple[int, int]]) -> None:
        while True:
            try:
                payload, source = self._sock.recvfrom(65535)
            except BlockingIOError:
                return
            self._received.append((payload, (str(source[0]), int(source[1]))))

    def received(self) -> list[Datagram]:
        """Datagrams read so far, as (payload, (source address, source port))."""
        return list(self._received)

    def wait(self, count: int, timeout: float = 1.0) -> bool:
        """Wait until ``count`` datagrams were read (True) or ``timeout`` passed."""
        return wait_until(lambda: len(self._received) >= count, timeout, 0.002)

    def stats(self) -> ListenerStats:
        info = sk_meminfo(self._sock)
        return ListenerStats(
            queued_bytes=info[SK_MEMINFO_RMEM_ALLOC],
            rcvbuf=info[SK_MEMINFO_RCVBUF],
            drops=info[SK_MEMINFO_DROPS],
            received=len(self._received),
        )


# ---------------------------------------------------------------- sender


@dataclass(frozen=True)
class SendResult:
    """What the sending application saw: datagrams accepted and errno of the refused ones."""

    sent: int
    failed: int
    errno: int | None = None  # the first failure's errno
    errors: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def error_name(self) -> str | None:
        """E.g. 'EPERM' (netfilter OUTPUT drop) or 'ENETUNREACH' (no route)."""
        return errno_codes.errorcode.get(self.errno, str(self.errno)) if self.errno else None


def send_udp(
    namespace: str,
    dst: str,
    dport: int,
    payload: bytes,
    count: int = 1,
    sport: int | None = None,
    src: str | None = None,
    timeout: float = 5.0,
    gso_size: int | None = None,
    dont_fragment: bool | None = None,
) -> SendResult:
    """Send ``count`` datagrams from the node's own stack; failures are counted by errno.

    The socket's family follows ``dst`` (IPv4 or IPv6).  ``timeout`` bounds a
    send blocked on a full send buffer (counted as EAGAIN).  ``gso_size`` sets
    UDP_SEGMENT: each send of ``payload`` leaves as ceil(len/gso_size)
    datagrams, segmented by the stack (or the device).  ``dont_fragment=True``
    sets IP_PMTUDISC_DO / IPV6_DONTFRAG: a datagram over the known path MTU
    gets EMSGSIZE, and a router on a smaller link answers with frag-needed /
    packet-too-big instead of fragmenting.  ``False`` sets IP_PMTUDISC_DONT
    (IPv4 without DF: routers fragment); None keeps the kernel's default
    (IPv4: IP_PMTUDISC_WANT, which also sets DF).  A socket the kernel refuses (or an
    option it lacks) raises OSError: the caller cannot claim to have sent.
    """
    family = family_of(dst)
    with netns.entered(namespace):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    errors: dict[int, int] = {}
    first: int | None = None
    sent = 0
    with sock:
        sock.settimeout(timeout)
        try:
            if gso_size is not None:
                sock.setsockopt(SOL_UDP, UDP_SEGMENT, gso_size)
            if dont_fragment is not None and family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, int(dont_fragment))
            elif dont_fragment is not None:
                mode = IP_PMTUDISC_DO if dont_fragment else IP_PMTUDISC_DONT
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, mode)
        except OSError:
            sock.close()
            raise
        try:
            if sport is not None or src is not None:
                sock.bind((src or ("::" if family == socket.AF_INET6 else "0.0.0.0"), sport or 0))
        except OSError as exc:
            code = exc.errno or errno_codes.EIO
            return SendResult(0, count, code, {code: count})
        for _ in range(count):
            try:
                sock.sendto(payload, (dst, dport))
                sent += 1
            except OSError as exc:
                code = exc.errno or errno_codes.EAGAIN  # socket.timeout carries no errno
                errors[code] = errors.get(code, 0) + 1
                first = first if first is not None else code
    return SendResult(sent, count - sent, first, errors)
