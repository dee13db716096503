"""Per-lab state under /run/labctl, and the per-lab lock.

Every lab name is checked by :func:`labctl.names.check_lab_name` before it
becomes a file name, and every file is opened relative to a checked fd of
/run/labctl/labs without following symlinks (see :mod:`labctl.kernel.registry`).

State is a convenience, never the only record: namespaces carry the lab's
name (``labctl-<lab>.<node>``), relays carry it on their command line and
global sysctls are owned by ``lab:<name>`` in the overrides registry, so
``down`` and ``clean`` work even when a crash left no state file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from labctl.errors import LabStateError, UnsafePathError
from labctl.kernel import registry
from labctl.kernel.registry import STATE_DIR
from labctl.names import check_lab_name, lab_name_problem

LABS_DIR = os.path.join(STATE_DIR, "labs")


@dataclass
class LabState:
    name: str
    file: str
    status: str  # "building" | "up"
    nodes: dict[str, str]  # node -> namespace
    relays: dict[str, int] = field(default_factory=dict)  # vm node -> relay pid
    started: float = field(default_factory=time.time)
    digest: str = ""
    tc: dict[str, str] = field(default_factory=dict)  # "node:iface" -> fingerprint of the tc built there
    interfaces: dict[str, list[str]] = field(default_factory=dict)
    """node -> the interfaces ``up`` made there: status names those the kernel no longer has (deleted by hand)."""


def digest(topo: Any) -> str:
    """A short fingerprint of a topology, to tell whether a lab's file changed since ``up``."""
    import hashlib  # only up needs it: status, down and exec read state without (2.5 ms of OpenSSL)

    return hashlib.sha256(json.dumps(topo.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _labs_dir() -> Iterator[int]:
    """A checked fd of /run/labctl/labs: every state and lock file is opened relative to it."""
    fd = registry.open_dir(LABS_DIR)
    try:
        yield fd
    finally:
        os.close(fd)


def _file(lab: str, suffix: str) -> str:
    """The file name of ``lab``'s state or lock; the name is checked first, by the one lab-name check."""
    return check_lab_name(lab) + suffix


def state_path(lab: str) -> str:
    return os.path.join(LABS_DIR, _file(lab, ".json"))


def load(lab: str) -> LabState | None:
    """The saved state of ``lab``; None when there is none or it is not a state labctl wrote."""
    name = _file(lab, ".json")
    with _labs_dir() as dir_fd:
        text = registry.read_text(dir_fd, name)
    if text is None:
        return None
    try:
        data = json.loads(text)
        loaded = LabState(**data) if isinstance(data, dict) else None
    except (json.JSONDecodeError, TypeError):
        return None
    return loaded if loaded is not None and loaded.name == lab else None


def save(state: LabState) -> None:
    """Write the state whole (atomically).

    Compact, from ``vars``: ``indent`` makes ``json`` use its Python encoder and ``asdict``
    deep-copies every node's list -- 0.016 s per save at 1000 nodes (now 0.0005 s), twice an ``up``.
    """
    name = _file(state.name, ".json")
    with _labs_dir() as dir_fd:
        registry.write_atomically(dir_fd, name, json.dumps(vars(state), separators=(",", ":")))


def forget(lab: str) -> None:
    name = _file(lab, ".json")
    with _labs_dir() as dir_fd, contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def known_labs() -> list[str]:
    """Labs with a state file (names that are not valid lab names are not labctl's and are skipped)."""
    with _labs_dir() as dir_fd:
        names = os.listdir(dir_fd)
    return sorted(n[:-5] for n in names if n.endswith(".json") and lab_name_problem(n[:-5]) is None)


def _lock(dir_fd: int, name: str, deadline: float | None) -> int | None:
    """Open and flock lock file ``name``; None when it stays busy until ``deadline`` (None: try once).

    A lock file is removed by whoever holds it when its lab is gone, so after
    taking the lock we check that the file we hold is still the one at that
    name; if not, another process removed it meanwhile and we start again.
    """
    while True:
        fd = registry.open_file(dir_fd, name, os.O_RDWR | os.O_CREAT)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is None or time.monotonic() > deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
        try:
            same = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(dir_fd: int, name: str, fd: int, remove: bool) -> None:
    """Release a lock taken by :func:`_lock`, removing its file first when ``remove`` (still holding it)."""
    try:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(fd)


def remove_lock_files(keep: set[str]) -> None:
    """Lock files of labs that are gone (``clean``); a lock in use is never removed."""
    with _labs_dir() as dir_fd:
        for name in os.listdir(dir_fd):
            if not name.endswith(".lock") or name[:-5] in keep or lab_name_problem(name[:-5]) is not None:
                continue
            try:
                fd = _lock(dir_fd, name, deadline=None)
            except UnsafePathError:
                continue
            if fd is not None:
                _unlock(dir_fd, name, fd, remove=True)


@contextlib.contextmanager
def locked(lab: str, wait: float = 10.0) -> Iterator[None]:
    """Hold the lab's lock; two commands on one lab never interleave.

    The lock file lives as long as the lab's state: when the body leaves no
    state behind (``down``, ``clean``, a failed first ``up``), the lock file
    is removed before the lock is released, so lock files do not pile up.
    """
    name = _file(lab, ".lock")
    with _labs_dir() as dir_fd:
        fd = _lock(dir_fd, name, deadline=time.monotonic() + wait)
        if fd is None:
            raise LabStateError(f"lab {lab} is locked by another labctl command")
        try:
            yield
        finally:
            try:
                gone = registry.read_text(dir_fd, _file(lab, ".json")) is None
            except UnsafePathError:
                gone = False
            _unlock(dir_fd, name, fd, remove=gone)
