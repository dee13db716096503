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

import errno as errno_codes
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from labctl.kernel import netns
from labctl.kernel.sockets import SK_MEMINFO_DROPS, SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_VARS, SO_MEMINFO

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


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


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
class TcpListener:
    """A TCP socket listening in ``namespace``; with ``accept`` a thread accepts and reads each connection to EOF.

    Without ``accept`` the handshakes the kernel completes wait in the accept queue (``backlog`` long, then
    the listener drops SYNs/ACKs: TcpExt.ListenOverflows, ListenDrops).
    """

    namespace: str
    port: int
    addr: str = "0.0.0.0"
    backlog: int = 16
    accept: bool = True
    _accepted: int = field(default=0, init=False)
    _bytes: int = field(default=0, init=False)
    _open: int = field(default=0, init=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        with netns.entered(self.namespace):
            self._sock = socket.socket(_family(self.addr), socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((self.addr.strip("[]"), self.port))
            self._sock.listen(self.backlog)
        except BaseException:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._closing = threading.Event()
        self._conns: dict[int, socket.socket] = {}
        if self.accept:
            self._thread = threading.Thread(target=self._serve, name=f"tcp-{self.port}", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closing.is_set():
            for fd, _ in poller.poll():
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

    def wait_idle(self, timeout: float = 1.0) -> bool:
        """Wait until every accepted connection reached EOF (True) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._open == 0:
                    return True
            time.sleep(0.005)
        return False

    def stats(self) -> TcpListenerStats:
        info = tcp_info(self._sock)
        raw = self._sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
        mem = struct.unpack(f"{len(raw) // 4}I", raw)
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

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        self._closing.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        for conn in self._conns.values():
            conn.close()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> TcpListener:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------- client


@dataclass(frozen=True)
class Attempt:
    """One connection: how it ended, the errno when it did not connect, bytes sent, the socket's last state."""

    outcome: str
    """connected | refused | timed_out | error"""
    errno: str | None
    sent: int
    state: str


def _name(code: int) -> str:
    return errno_codes.errorcode.get(code, str(code))


def connect_tcp(
    namespace: str, host: str, port: int, payload: bytes = b"", timeout: float = 1.0, linger: float = 1.0
) -> Attempt:
    """Connect from the node's own stack, send ``payload``, half-close and wait (``linger``) for the peer's EOF.

    ``TCP_USER_TIMEOUT`` makes the kernel itself give up on an unanswered SYN at its first retransmission
    timer after ``timeout`` (ETIMEDOUT, as a real client would see it), instead of after 2 minutes.
    """
    with netns.entered(namespace):
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
    with sock:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(timeout * 1000)))
        code = sock.connect_ex((host.strip("[]"), port))
        if code not in (0, errno_codes.EINPROGRESS):
            return Attempt("error", _name(code), 0, tcp_info(sock).state)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        # the kernel's SYN timer fires at the first RTO (1 s) at the earliest: wait for its verdict
        if not poller.poll(int((max(timeout, 1.0) + 2.0) * 1000)):
            return Attempt("timed_out", "ETIMEDOUT", 0, tcp_info(sock).state)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            outcome = {errno_codes.ECONNREFUSED: "refused", errno_codes.ETIMEDOUT: "timed_out"}.get(code, "error")
            return Attempt(outcome, _name(code), 0, tcp_info(sock).state)
        sent = _send_all(sock, payload, time.monotonic() + max(timeout, linger))
        state = tcp_info(sock).state
        sock.shutdown(socket.SHUT_WR)
        if payload:  # the transfer is done when the server has read it all and closed
            _wait_eof(sock, time.monotonic() + linger)
        return Attempt("connected", None, sent, state)


def _send_all(sock: socket.socket, payload: bytes, deadline: float) -> int:
    view = memoryview(payload)
    sent = 0
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    while sent < len(view) and time.monotonic() < deadline:
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            poller.poll(max(1, int((deadline - time.monotonic()) * 1000)))
        except OSError:
            break
    return sent


def _wait_eof(sock: socket.socket, deadline: float) -> None:
    """Until the server closes its side (it read everything) or the deadline: then bytes received are final."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while time.monotonic() < deadline:
        if not poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            return
        try:
            if not sock.recv(65536):
                return
        except BlockingIOError:
            continue
        except OSError:
            return
