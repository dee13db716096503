"""Which lab node a task works for, and which lab device names other namespaces also have (``--follow``)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence

from labctl.kernel import netns
from labctl.kernel.procnet import read_in
from labctl.lab.trace.knowledge import Knowledge

LAB_TASK_TTL = 60.0
OTHER_TASK_TTL = 1.0
FOREIGN = "<foreign>"
"""Verdict for a task that works for another namespace (lives in one, or holds only its sockets)."""
UNKNOWN = "<unknown>"
"""Verdict for a user task of labctl's own namespace holding no socket now (``labctl inject`` after sending)."""
KERNEL = "<kernel>"
"""Verdict for the idle task, kernel threads and tasks already gone: they run everyone's softirqs."""


class TaskMap:
    """Which lab node a task (thread id) works for, from its namespace or the sockets it holds.

    Used by ``--follow``, where the traffic is not ours: an skb on a device
    name that other namespaces also have (every host has an eth0) is the lab's
    when the task that started it lives in a lab namespace, holds a socket of
    one (asked of the socket itself: pidfd_getfd + SIOCGSKNS), or is the lab's
    VM relay.  A task holding a socket of any other namespace but labctl's own
    is :data:`FOREIGN`.  ``labctl inject`` runs in labctl's namespace and holds
    its lab socket for about a millisecond, so a task of that namespace with no
    other evidence is :data:`UNKNOWN`: its skb is shown if it crossed a lab
    link (a transmit, then a receive on the far end's name) -- which a short-
    lived injector into *another* lab with the same names would also do.
    """

    def __init__(self, knowledge: Knowledge) -> None:
        self.k = knowledge
        self.inodes: dict[int, str] = {}
        for node, ns in knowledge.namespaces.items():
            with contextlib.suppress(OSError):
                self.inodes[os.stat(netns.path(ns)).st_ino] = node
        self.relays = dict(knowledge.relays)
        self._cache: dict[int, tuple[float, str]] = {}
        self._sockets: dict[int, str] = {}
        self._sockets_at = 0.0
        # labctl's own namespace (the host's, normally; /proc/1 may not be readable in a container)
        self._root = os.stat("/proc/self/ns/net").st_ino

    def _socket_inodes(self, max_age: float = 1.0) -> dict[int, str]:
        """Socket inode → node, for every socket of the lab's namespaces (re-read when older than max_age)."""
        if time.monotonic() - self._sockets_at > max_age:
            found: dict[int, str] = {}
            for node, ns in self.k.namespaces.items():
                for table in ("packet", "udp", "tcp", "raw", "icmp"):
                    with contextlib.suppress(OSError, netns.NamespaceError):
                        for line in read_in(ns, f"/proc/net/{table}").splitlines()[1:]:
                            parts = line.split()
                            column = 8 if table == "packet" else 9
                            if len(parts) > column and parts[column].isdigit():
                                found[int(parts[column])] = node
            self._sockets, self._sockets_at = found, time.monotonic()
        return self._sockets

    def verdict(self, tid: int) -> str:
        """A lab node's name, or :data:`FOREIGN`, :data:`UNKNOWN` or :data:`KERNEL`.

        Kept for a minute when it names a node (a ping that exited has still
        sent what the trace shows later), a second otherwise (a task may enter
        a lab namespace or open a socket in one).  Callers ask as soon as a
        task's events are read, while it still exists.
        """
        if tid <= 0:
            return KERNEL
        cached = self._cache.get(tid)
        if cached is not None:
            lab_task = cached[1] not in (FOREIGN, UNKNOWN, KERNEL)
            if time.monotonic() - cached[0] < (LAB_TASK_TTL if lab_task else OTHER_TASK_TTL):
                return cached[1]
        answer = self._classify(tid)
        self._cache[tid] = (time.monotonic(), answer)
        return answer

    def node_of(self, tid: int) -> str | None:
        """The lab node the task works for, or None."""
        answer = self.verdict(tid)
        return None if answer in (FOREIGN, UNKNOWN, KERNEL) else answer

    def _classify(self, tid: int) -> str:
        if tid in self.relays:
            return self.relays[tid]
        try:
            inode = os.stat(f"/proc/{tid}/ns/net").st_ino
            os.readlink(f"/proc/{tid}/exe")  # kernel threads have no executable
        except OSError:
            return KERNEL
        if inode in self.inodes:
            return self.inodes[inode]
        held: dict[int, int] = {}  # fd → socket inode
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{tid}/fd"):
                with contextlib.suppress(OSError, ValueError):
                    target = os.readlink(f"/proc/{tid}/fd/{fd}")
                    if target.startswith("socket:["):
                        held[int(fd)] = int(target[8:-1])
        if not held:
            return UNKNOWN if inode == self._root else FOREIGN
        namespaces = socket_namespaces(tid, list(held))
        if namespaces is None:  # no pidfd_getfd here: look the sockets up in the lab's tables
            sockets = self._socket_inodes()
            if not set(held.values()) & sockets.keys():  # a socket opened since the last look
                sockets = self._socket_inodes(max_age=0.02)
            node = next((sockets[i] for i in held.values() if i in sockets), None)
            return node if node is not None else FOREIGN
        node = next((self.inodes[ns] for ns in namespaces if ns in self.inodes), None)
        if node is not None:
            return node
        if any(ns != self._root for ns in namespaces):  # works in another lab or container
            return FOREIGN
        return UNKNOWN if inode == self._root else FOREIGN


_SYS_PIDFD_GETFD = 438
SIOCGSKNS = 0x894C
"""ioctl on a socket: a new fd of the network namespace the socket belongs to."""


def socket_namespaces(tid: int, fds: Sequence[int]) -> list[int] | None:
    """Inodes of the network namespaces of another task's socket fds (None: this kernel cannot say).

    Each fd is duplicated with pidfd_getfd(2) and asked its namespace with
    SIOCGSKNS: exact, and immune to the socket's namespace having the same
    device names as the lab's.  Sockets closed meanwhile are skipped.
    """
    import ctypes
    import fcntl

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with open(f"/proc/{tid}/status") as f:
            tgid = int(next(line.split()[1] for line in f if line.startswith("Tgid:")))
        pidfd = os.pidfd_open(tgid)
    except (OSError, StopIteration, ValueError):
        return []
    inodes: list[int] = []
    try:
        for fd in fds:
            local = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if local < 0:
                if ctypes.get_errno() in (38, 1):  # ENOSYS, EPERM: not available to us
                    return None
                continue
            try:
                ns_fd = fcntl.ioctl(local, SIOCGSKNS)
                try:
                    inodes.append(os.fstat(ns_fd).st_ino)
                finally:
                    os.close(ns_fd)
            except OSError:
                pass
            finally:
                os.close(local)
    finally:
        os.close(pidfd)
    return inodes


def foreign_device_names(knowledge: Knowledge) -> set[str]:
    """Device names that exist in namespaces other than the lab's (the root's, other labs', containers')."""
    lab_inodes = set()
    for ns in knowledge.namespaces.values():
        with contextlib.suppress(OSError):
            lab_inodes.add(os.stat(netns.path(ns)).st_ino)
    names: set[str] = set()
    seen: set[int] = set(lab_inodes)
    for name in netns.list_all():
        with contextlib.suppress(OSError):
            inode = os.stat(netns.path(name)).st_ino
            if inode in seen:
                continue
            seen.add(inode)
            with contextlib.suppress(netns.NamespaceError, OSError):
                names |= _dev_names(read_in(name, "/proc/net/dev"))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
            if inode in seen:
                continue
            seen.add(inode)
            with open(f"/proc/{entry}/net/dev") as f:
                names |= _dev_names(f.read())
    return names


def _dev_names(text: str) -> set[str]:
    return {line.split(":", 1)[0].strip() for line in text.splitlines()[2:] if ":" in line}
