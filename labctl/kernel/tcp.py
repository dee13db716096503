"""A node's own TCP sockets: a listener (accepting or not) and connecting clients.

What a connection attempt ends as is the evidence, so it is returned, never
raised: ``connected`` (the handshake completed), ``refused`` (an RST answered
the SYN: ECONNREFUSED), ``timed_out`` (no answer before the step's timeout:
the SYN was dropped somewhere), or another errno (EHOSTUNREACH from an ICMP
error, ENETUNREACH without a route).  On 6.x a SYN dropped by netfilter in
OUTPUT does *not* fail ``connect`` with EPERM as a UDP send does:
``tcp_connect`` ignores the transmit error and retransmits, so the attempt
times out (ETIMEDOUT) -- the drop itself is in the trace (NETFILTER_DROP).

The listener's view comes from ``TCP_INFO``: for a LISTEN socket the kernel
reports the accept queue's length in ``tcpi_unacked`` and the backlog in
``tcpi_sacked`` (``ss -lnt`` shows the same two numbers as Recv-Q/Send-Q).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from labctl.kernel import netns
from labctl.kernel.sockets import (
    SK_MEMINFO_DROPS,
    SK_MEMINFO_RMEM_ALLOC,
    SocketListener,
    family_of,
    sk_meminfo,
    wait_until,
)

TCP_STATES = (
    "",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
)
"""Names of ``tcpi_state`` values (include/net/tcp_states.h), as ``ss`` prints them."""

_TCP_INFO_LEN = 104
_OFF_UNACKED = 24  # after 8 u8 (state, ca_state, ...) and 4 u32 (rto, ato, snd_mss, rcv_mss)


@dataclass(frozen=True)
class TcpInfo:
    state: str
    queue: int
    """LISTEN: connections waiting in the accept queue; otherwise unacknowledged segments."""
    backlog: int
    """LISTEN: the accept queue's limit (listen's backlog, capped by somaxconn)."""


def tcp_info(sock: socket.socket) -> TcpInfo:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    unacked, sacked = struct.unpack_from("II", raw, _OFF_UNACKED)
    state = TCP_STATES[raw[0]] if raw[0] < len(TCP_STATES) else str(raw[0])
    return TcpInfo(state, unacked, sacked)


@dataclass(frozen=True)
class TcpListenerStats:
    state: str
    accept_queue: int
    backlog: int
    accepted: int
    received_bytes: int
    queued_bytes: int
    drops: int
    """sk_drops of the listener: SYNs and handshakes it dropped (a full accept queue: ListenDrops)."""


@dataclass
class TcpListener(SocketListener):
    """A TCP socket listening in ``namespace``; with ``accept`` a thread accepts and reads each connection to EOF.

    Without ``accept`` the handshakes the kernel completes wait in the accept queue (``backlog`` long, then
    the listener drops SYNs/ACKs: TcpExt.ListenOverflows, ListenDrops).
    """

    kind: ClassVar[socket.SocketKind] = socket.SOCK_STREAM
    thread_prefix: ClassVar[str] = "tcp"

    backlog: int = 16
    accept: bool = True
    _accepted: int = field(default=0, init=False)
    _bytes: int = field(default=0, init=False)
    _open: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        super().__post_init__()

    def _prepare(self) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.addr.strip("[]"), self.port))
        self._sock.listen(self.backlog)

    def _serving(self) -> bool:
        return self.accept

    def _on_events(self, poller: select.poll, events: list[tuple[int, int]]) -> None:
        for fd, _ in events:
            if fd == self._sock.fileno():
                self._accept_all(poller)
            elif fd in self._conns:
                self._read(fd, poller)

    def _accept_all(self, poller: select.poll) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self._conns[conn.fileno()] = conn
            poller.register(conn.fileno(), select.POLLIN)
            with self._lock:
                self._accepted += 1
                self._open += 1

    def _read(self, fd: int, poller: select.poll) -> None:
        conn = self._conns[fd]
        while True:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # EOF (or a reset): the client is done
                poller.unregister(fd)
                del self._conns[fd]
                conn.close()
                with self._lock:
                    self._open -= 1
                return
            with self._lock:
                self._bytes += len(data)

    def _idle(self) -> bool:
        with self._lock:
            return self._open == 0

    def wait_idle(self, timeout: float = 1.0) -> bool:
        """Wait until every accepted connection reached EOF (True) or ``timeout`` passed."""
        return wait_until(self._idle, timeout, 0.005)

    def stats(self) -> TcpListenerStats:
        info = tcp_info(self._sock)
        mem = sk_meminfo(self._sock)
        with self._lock:
            return TcpListenerStats(
                state=info.state,
                accept_queue=info.queue,
                backlog=info.backlog,
                accepted=self._accepted,
                received_bytes=self._bytes,
                queued_bytes=mem[SK_MEMINFO_RMEM_ALLOC],
                drops=mem[SK_MEMINFO_DROPS],
            )

    def _release(self) -> None:
        for conn in self._conns.values():
            conn.close()


# ---------------------------------------------------------------- client


@dataclass(frozen=True)
class Attempt:
    """One connection: how it ended, the errno when it did not connect, bytes sent, the socket's last state."""

    outcome: str
    """connected | refused | timed_out | error (another errno) | not_tried (the call ran out of time)"""
    errno: str | None
    sent: int
    state: str


def _name(code: int) -> str:
    return errno_codes.errorcode.get(code, str(code))


HANDSHAKE_GRACE = 2.0
"""Seconds past the timeout (and past the kernel's first SYN retransmission at 1 s) to hear the verdict."""
EOF_WAIT = 2.0
"""Seconds, for all connections together, for the server to read everything and close."""


STEP_BUDGET = 60.0
"""Seconds the handshakes of one call may take together: past it, the connections not yet tried are errors."""


def connect_tcp(
    namespace: str, host: str, port: int, payload: bytes = b"", count: int = 1, timeout: float = 1.0
) -> list[Attempt]:
    """``count`` connections from the node's own stack, one handshake after the other (so what the first did
    to the listener -- a full accept queue -- is what the second meets); then each sends ``payload``,
    half-closes and waits for the server's EOF, all together (the bytes the server read are then final).

    ``TCP_USER_TIMEOUT`` makes the kernel itself give up on an unanswered SYN (ETIMEDOUT, as a real client
    sees it) instead of after two minutes.  The whole call is bounded: handshakes by ``STEP_BUDGET``, the
    transfer and the wait for EOF by one deadline each for all connections.
    """
    with netns.entered(namespace):
        socks = [socket.socket(family_of(host), socket.SOCK_STREAM) for _ in range(count)]
    try:
        results: dict[int, Attempt] = {}
        connected: dict[int, socket.socket] = {}
        budget = time.monotonic() + STEP_BUDGET
        for index, sock in enumerate(socks):
            if time.monotonic() > budget:
                results[index] = Attempt("not_tried", None, 0, "")  # the step ran out of time
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(timeout * 1000)))
            code = sock.connect_ex((host.strip("[]"), port))
            if code not in (0, errno_codes.EINPROGRESS):
                results[index] = Attempt("error", _name(code), 0, tcp_info(sock).state)
                continue
            deadline = min(budget, time.monotonic() + max(timeout, 1.0) + HANDSHAKE_GRACE)
            connected |= _handshakes({index: sock}, results, deadline)
        sent = _send_all(connected, payload, time.monotonic() + max(timeout, EOF_WAIT))
        for index, sock in connected.items():
            results[index] = Attempt("connected", None, sent[index], tcp_info(sock).state)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        if payload:  # the transfer is done when the server has read it all and closed
            _wait_eof(connected, time.monotonic() + EOF_WAIT)
        return [results[i] for i in range(count)]
    finally:
        for sock in socks:
            sock.close()


def _handshakes(
    pending: dict[int, socket.socket], results: dict[int, Attempt], deadline: float
) -> dict[int, socket.socket]:
    """Wait for every pending connect's verdict; the connected sockets, by index."""
    connected: dict[int, socket.socket] = {}
    by_fd = {sock.fileno(): index for index, sock in pending.items()}
    for fd in _ready(by_fd, select.POLLOUT, deadline):
        index = by_fd.pop(fd)
        sock = pending[index]
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            connected[index] = sock
        else:
            outcome = {errno_codes.ECONNREFUSED: "refused", errno_codes.ETIMEDOUT: "timed_out"}.get(code, "error")
            results[index] = Attempt(outcome, _name(code), 0, tcp_info(sock).state)
    for index in by_fd.values():  # the kernel had not given up yet: no answer within the step's time
        results[index] = Attempt("timed_out", "ETIMEDOUT", 0, tcp_info(pending[index]).state)
    return connected


def _send_all(socks: dict[int, socket.socket], payload: bytes, deadline: float) -> dict[int, int]:
    sent = dict.fromkeys(socks, 0)
    if not payload:
        return sent
    view = memoryview(payload)
    by_fd = {sock.fileno(): index for index, sock in socks.items()}
    for fd in _ready(by_fd, select.POLLOUT, deadline):
        index = by_fd[fd]
        try:
            sent[index] += socks[index].send(view[sent[index]:])
        except BlockingIOError:
            continue
        except OSError:  # a reset mid-transfer: what went out is what counts
            by_fd.pop(fd)
            continue
        if sent[index] >= len(view):
            by_fd.pop(fd)
    return sent


def _wait_eof(socks: dict[int, socket.socket], deadline: float) -> None:
    """Until every server closed its side (it read everything) or the deadline."""
    by_fd = {sock.fileno(): sock for sock in socks.values()}
    for fd in _ready(by_fd, select.POLLIN, deadline):
        try:
            data = by_fd[fd].recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            by_fd.pop(fd)


def _ready(pending: Mapping[int, object], events: int, deadline: float) -> Iterator[int]:
    """Each fd of ``pending`` as ``poll`` finds it ready for ``events``, until none is pending or ``deadline``.

    The caller takes an fd out of ``pending`` when it is done with it; it is then no longer polled.
    """
    poller = select.poll()
    for fd in pending:
        poller.register(fd, events)
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            yield fd
            if fd not in pending:
                poller.unregister(fd)
