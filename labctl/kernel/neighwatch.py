"""Neighbour and bridge-fdb notifications of one namespace, and its fdb table with ports.

Tracepoints such as ``bridge:br_fdb_update`` and ``neigh:*`` carry a device
name but no namespace, so another namespace with the same names (every lab
has an eth0) produces look-alike events.  rtnetlink notifications are
delivered only to sockets of the namespace they happened in: a socket bound
to RTNLGRP_NEIGH inside a lab namespace hears exactly that namespace's
neighbour state changes (``FAILED`` after unanswered ARP) and the fdb entries
its bridges learn.  They are what makes those tracepoint events attributable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from labctl.kernel import netns

NETLINK_ROUTE = 0
RTMGRP_NEIGH = 0x4
AF_BRIDGE = 7
RTM_NEWNEIGH = 28
NDA_DST, NDA_LLADDR, NDA_MASTER = 1, 2, 9
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, ifindex, state, flags, type


def _neighbour_messages(data: bytes) -> list[tuple[int, int, int, dict[int, bytes]]]:
    """(family, ifindex, state, attributes) of each RTM_NEWNEIGH in one read of the socket.

    Decoded here, not with pyroute2's marshal: importing it costs 0.1 s of a one-packet ``labctl trace``.
    """
    from labctl.kernel.netlink import attributes

    found = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        body = offset + _NLMSGHDR.size
        if kind == RTM_NEWNEIGH and length >= _NLMSGHDR.size + _NDMSG.size:
            family, ifindex, state, _, _ = _NDMSG.unpack_from(data, body)
            found.append((family, ifindex, state, attributes(data[: offset + length], body + _NDMSG.size)))
        offset += (length + 3) & ~3
    return found

NUD_STATES = {
    0x01: "INCOMPLETE",
    0x02: "REACHABLE",
    0x04: "STALE",
    0x08: "DELAY",
    0x10: "PROBE",
    0x20: "FAILED",
    0x40: "NOARP",
    0x80: "PERMANENT",
}
NTF_MASTER = 0x04
NTF_EXT_LEARNED = 0x10
NTF_STICKY = 0x40


@dataclass(frozen=True)
class NeighNote:
    """One notification: ``neigh`` (an IP neighbour) or ``fdb`` (a MAC a bridge port learnt)."""

    kind: str
    device: str
    address: str
    state: str
    master: str | None = None
    received: float = 0.0
    """CLOCK_MONOTONIC seconds when it was read (the trace clock): it follows the kernel's tracepoint closely."""

    def text(self) -> str:
        if self.kind == "fdb":
            return f"fdb {self.address} {self.device} {self.state}"
        return f"neigh {self.address} {self.device} {self.state}"


def _state_name(state: int) -> str:
    names = [name for bit, name in NUD_STATES.items() if state & bit]
    return "|".join(names) or "NONE"


class NeighWatch:
    """Listen, inside ``namespace``, for neighbour and fdb notifications until :meth:`close`."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        with netns.entered(namespace):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, RTMGRP_NEIGH))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self._names: dict[int, str] = {}
        self._notes: list[NeighNote] = []
        self.overruns = 0
        """Times the socket overflowed (ENOBUFS): notifications were lost, so vouching may miss events."""

    def _ifname(self, index: int) -> str:
        if index not in self._names:
            with netns.entered(self.namespace):
                try:
                    self._names[index] = socket.if_indextoname(index)
                except OSError:
                    self._names[index] = f"if{index}"
        return self._names[index]

    def fileno(self) -> int:
        return self._sock.fileno()

    def pump(self) -> None:
        """Read what is waiting now, stamping each notification with the time it was read."""
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # overrun: some notifications are lost -- say so
                    self.overruns += 1
                    continue
                raise
            now = time.monotonic()
            for family, ifindex, state, attrs in _neighbour_messages(data):
                device = self._ifname(ifindex)
                if family == AF_BRIDGE:
                    mac = attrs.get(NDA_LLADDR)
                    master = attrs.get(NDA_MASTER)
                    if mac:
                        master_index = struct.unpack("=I", master)[0] if master and len(master) >= 4 else 0
                        self._notes.append(
                            NeighNote(
                                "fdb",
                                device,
                                ":".join(f"{b:02x}" for b in mac),
                                _state_name(state),
                                self._ifname(master_index) if master_index else None,
                                now,
                            )
                        )
                else:
                    dst = attrs.get(NDA_DST)
                    if dst and family in (socket.AF_INET, socket.AF_INET6):
                        text = socket.inet_ntop(family, dst)
                        self._notes.append(NeighNote("neigh", device, text, _state_name(state), None, now))

    def notes(self) -> list[NeighNote]:
        """Everything heard so far, in the kernel's order; the socket stays open."""
        self.pump()
        return list(self._notes)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> NeighWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WatchPump:
    """One thread that reads every watch as notifications arrive, so each gets a close timestamp."""

    def __init__(self, watches: Sequence[NeighWatch]) -> None:
        self._watches = list(watches)
        self.error: str | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="neighwatch", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            os.close(self._stop_r)
            os.close(self._stop_w)
            raise

    def _run(self) -> None:
        try:
            poller = select.poll()
            by_fd = {w.fileno(): w for w in self._watches}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            poller.register(self._stop_r, select.POLLIN)
            while True:
                for fd, _ in poller.poll():
                    if fd == self._stop_r:
                        return
                    by_fd[fd].pump()
        except Exception as exc:  # reported by the window, which turns it into an ERROR
            self.error = f"neighbour notifications could not be read: {exc!r}"

    def close(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=2)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> WatchPump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class FdbRow:
    mac: str
    port: str
    flags: tuple[str, ...]


def fdb_entries(namespace: str, bridge: str) -> list[FdbRow]:
    """The bridge's learnt and static entries with their port (local permanent entries of its own ports left out)."""
    ipr = netns.netlink(namespace)
    try:
        index = ipr.link_lookup(ifname=bridge)
        if not index:
            return []
        links = ipr.get_links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        local = {str(link.get_attr("IFLA_ADDRESS")).lower() for link in links}
        rows: list[FdbRow] = []
        for msg in ipr.get_neighbours(family=AF_BRIDGE, master=index[0]):
            mac = msg.get_attr("NDA_LLADDR")
            if not mac:
                continue
            state, flags = msg["state"], msg["flags"]
            port = names.get(msg["ifindex"], str(msg["ifindex"]))
            if state & 0x80 and str(mac).lower() in local:
                continue  # a port's own MAC (local, permanent) is not something the bridge learnt
            words = []
            if state & 0x80:
                words.append("permanent")
            elif state & 0x40:
                words.append("static")
            else:
                words.append("learned")
            if flags & NTF_STICKY:
                words.append("sticky")
            if flags & NTF_EXT_LEARNED:
                words.append("extern_learn")
            rows.append(FdbRow(str(mac).lower(), port, tuple(words)))
        return rows
    finally:
        ipr.close()


def flush_learned(namespace: str, bridge: str) -> int:
    """Forget what ``bridge`` learnt (entries neither permanent nor static); returns how many were removed.

    A check about learning and flooding must start from a bridge that knows
    nothing yet, whatever ran before it.
    """
    ipr = netns.netlink(namespace)
    try:
        index = ipr.link_lookup(ifname=bridge)
        if not index:
            return 0
        removed = 0
        for msg in ipr.get_neighbours(family=AF_BRIDGE, master=index[0]):
            mac = msg.get_attr("NDA_LLADDR")
            if not mac or msg["state"] & (0x80 | 0x40):  # permanent (local) or static (the user's)
                continue
            ipr.neigh("del", family=AF_BRIDGE, ifindex=msg["ifindex"], lladdr=mac, flags=NTF_MASTER, state=msg["state"])
            removed += 1
        return removed
    finally:
        ipr.close()
