"""Network namespaces, created and entered in-process.

pyroute2's ``netns.create`` forks a helper per namespace, which dominates the
build time of large labs; here the calling thread unshares, bind-mounts and
returns (pyroute2's own ``setns(..., fork=False)`` path), which costs a few
syscalls.  Everything that must run *inside* a namespace -- sysctl writes,
ioctls, AF_PACKET sockets, child processes -- goes through :func:`entered`,
which moves only the calling thread and always moves it back.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as _pyroute2_netns

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


@contextlib.contextmanager
def _saved_namespace() -> Iterator[None]:
    """Remember the calling thread's namespace and go back to it on exit."""
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        yield
    finally:
        try:
            _pyroute2_netns.setns(saved)
        finally:
            os.close(saved)


def create(name: str) -> None:
    """Create the named namespace without forking; fails if it exists."""
    if exists(name):
        raise NamespaceError(f"network namespace {name} already exists")
    with _saved_namespace():
        try:
            _pyroute2_netns.setns(name, flags=os.O_CREAT | os.O_EXCL, fork=False)
        except OSError as exc:
            raise NamespaceError(f"cannot create network namespace {name}: {exc}") from exc


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace ``name``.

    Sockets opened and processes started in the body belong to that namespace
    for their whole life, which is how per-node netlink sockets, AF_PACKET
    captures and ``exec`` children are bound to a node.
    """
    if not exists(name):
        raise NamespaceError(f"network namespace {name} does not exist")
    with _saved_namespace():
        _pyroute2_netns.setns(name, flags=0)
        yield


def netlink(name: str) -> IPRoute:
    """An rtnetlink socket that lives in namespace ``name``."""
    with entered(name):
        return IPRoute()


def remove(name: str) -> None:
    """Unmount and unlink the namespace; the kernel frees it once unused."""
    if exists(name):
        _pyroute2_netns.remove(name)


def popen(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a process inside namespace ``name`` (it inherits the thread's netns)."""
    with entered(name):
        return subprocess.Popen(list(argv), **kwargs)


def run(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run a process inside namespace ``name`` to completion."""
    with entered(name):
        return subprocess.run(list(argv), **kwargs)
