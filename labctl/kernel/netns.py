"""Network namespaces, created and entered in-process.

pyroute2's ``netns.create`` forks a helper per namespace, and even its
in-process path lists /run/netns on every ``setns`` (quadratic in a lab of
a thousand nodes) and costs 0.2 s of imports; here the calling thread
unshares, bind-mounts and returns through libc directly, as ``ip netns add``
does, which costs a few syscalls.  Everything that must run *inside* a
namespace -- sysctl writes, ioctls, AF_PACKET sockets, child processes --
goes through :func:`entered`, which moves only the calling thread and always
moves it back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyroute2 import IPRoute

NETNS_RUN_DIR = "/run/netns"
PREFIX = "labctl-"
"""Every namespace labctl creates starts with this; ``clean`` relies on it."""


class NamespaceError(RuntimeError):
    """A namespace could not be created, entered or removed."""


def namespace_name(lab: str, node: str) -> str:
    """The namespace that holds ``node`` of ``lab`` (``labctl-<lab>.<node>``)."""
    return f"{PREFIX}{lab}.{node}"


def split_namespace_name(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`namespace_name`; None for a namespace that is not ours."""
    if not name.startswith(PREFIX) or "." not in name:
        return None
    from labctl.names import scratch_owner

    if scratch_owner(name) is not None:  # a diagnosis scratch namespace, reclaimed by its owner pid
        return None
    lab, _, node = name[len(PREFIX) :].rpartition(".")
    return lab, node


def path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def list_all() -> list[str]:
    """Names of every namespace under /run/netns (ours or not)."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def list_labctl(lab: str | None = None) -> list[str]:
    """Namespaces labctl made, optionally only those of one lab."""
    names = []
    for name in list_all():
        parts = split_namespace_name(name)
        if parts is not None and (lab is None or parts[0] == lab):
            names.append(name)
    return names


CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
LIBC = ctypes.CDLL(None, use_errno=True)
"""libc, for the namespace and mount calls labctl makes itself (sysfs.py shares it)."""


def check_call(result: int, what: str) -> None:
    """Raise OSError with errno when a libc call returned non-zero."""
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    check_call(LIBC.setns(fd, CLONE_NEWNET), "setns")


@contextlib.contextmanager
def _saved_namespace() -> Iterator[None]:
    """Remember the calling thread's namespace and go back to it on exit."""
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        yield
    finally:
        try:
            setns_fd(saved)
        finally:
            os.close(saved)


_run_dir_shared = False


def _share_run_dir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does (once per process)."""
    global _run_dir_shared
    if _run_dir_shared:
        return
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    run_dir = NETNS_RUN_DIR.encode()
    if LIBC.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) != 0:
        check_call(LIBC.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), f"bind {NETNS_RUN_DIR}")
        check_call(LIBC.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None), f"share {NETNS_RUN_DIR}")
    _run_dir_shared = True


def create(name: str) -> None:
    """Create the named namespace without forking; fails if it exists."""
    target = path(name)
    try:
        _share_run_dir()
        os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise NamespaceError(f"network namespace {name} already exists") from None
    except OSError as exc:
        raise NamespaceError(f"cannot create network namespace {name}: {exc}") from exc
    try:
        with _saved_namespace():
            check_call(LIBC.unshare(CLONE_NEWNET), "unshare")
            check_call(LIBC.mount(b"/proc/thread-self/ns/net", target.encode(), b"none", MS_BIND, None), "bind mount")
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise NamespaceError(f"cannot create network namespace {name}: {exc}") from exc


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace ``name``.

    Sockets opened and processes started in the body belong to that namespace
    for their whole life, which is how per-node netlink sockets, AF_PACKET
    captures and ``exec`` children are bound to a node.
    """
    try:
        fd = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(f"network namespace {name} does not exist") from None
    try:
        with _saved_namespace():
            setns_fd(fd)
            yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def walking(names: Iterable[str]) -> Iterator[Iterator[str]]:
    """An iterator that enters each namespace in turn (the loop body runs inside it); back at the end.

        with netns.walking(names) as entering:
            for name in entering:
                ...  # the calling thread is inside ``name``

    One switch per namespace instead of :func:`entered`'s two, and one open
    of the caller's own namespace for the whole walk: what a reader of a
    thousand namespaces (status) pays per node.  A context manager, not a
    bare generator, so an exception in the loop body still returns the
    thread to its namespace at once.  A namespace removed meanwhile, or a
    stale file that is no namespace, is skipped.
    """
    with _saved_namespace():
        yield _enter_each(names)


def _enter_each(names: Iterable[str]) -> Iterator[str]:
    for name in names:
        try:
            fd = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            entered_now = LIBC.setns(fd, CLONE_NEWNET) == 0
        finally:
            os.close(fd)
        if entered_now:
            yield name


def netlink(name: str) -> IPRoute:
    """A pyroute2 rtnetlink socket that lives in namespace ``name`` (for what links.py does not do)."""
    from pyroute2 import IPRoute

    with entered(name):
        return IPRoute()


def remove(name: str) -> None:
    """Unmount and unlink the namespace; the kernel frees it once unused."""
    target = path(name)
    if LIBC.umount2(target.encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        check_call(-1, f"umount {target}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)


def popen(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a process inside namespace ``name`` (it inherits the thread's netns)."""
    with entered(name):
        return subprocess.Popen(list(argv), **kwargs)


def run(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run a process inside namespace ``name`` to completion."""
    with entered(name):
        return subprocess.run(list(argv), **kwargs)
