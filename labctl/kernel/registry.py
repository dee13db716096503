"""Small JSON registries under /run/labctl, read-modify-written under a file lock.

Host-wide changes (global sysctls, kernel modules) are recorded here before
they happen, so that any later process -- ``down`` or ``clean`` after a crash
-- can undo them.

labctl runs as root, so every file it opens here is opened relative to a
directory file descriptor that was checked to be a real directory owned by
us and writable by nobody else, and never through a symlink (``O_NOFOLLOW``):
a planted link cannot make root create, truncate or delete a file elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

from labctl.errors import UnsafePathError

STATE_DIR = "/run/labctl"

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS


def open_dir(path: str) -> int:
    """A checked fd of directory ``path`` (each level made 0700 when missing); the caller closes it.

    Below /run every component of /run/labctl/... is opened with ``O_NOFOLLOW``
    relative to its parent and must be ours and writable only by us, so no
    component can be a symlink or a directory someone else prepared.
    """
    path = path.rstrip("/")
    if path == STATE_DIR or path.startswith(STATE_DIR + "/"):
        parent, parts = os.path.dirname(STATE_DIR), path[len(os.path.dirname(STATE_DIR)) + 1 :].split("/")
    else:  # a registry elsewhere (tests): only its last component is checked
        parent, parts = os.path.dirname(path), [os.path.basename(path)]
    fd = os.open(parent or "/", _DIR_FLAGS)
    for part in parts:
        fd = _open_or_make(fd, part, path)
    return fd


def _open_or_make(parent_fd: int, name: str, where: str) -> int:
    """Open (creating it 0700) directory ``name`` under ``parent_fd`` and check it; closes ``parent_fd``."""
    try:
        if name in ("", ".", ".."):
            raise UnsafePathError(f"{where}: not a plain path")
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise UnsafePathError(f"{where}: {name} is not a directory of labctl's ({exc.strerror})") from exc
    finally:
        os.close(parent_fd)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        os.close(fd)
        raise UnsafePathError(f"{where} is not labctl's own (owner uid {info.st_uid}, mode {info.st_mode & 0o777:o})")
    return fd


def open_file(dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """Open ``name`` in ``dir_fd`` without following a symlink; only a regular file of ours is accepted."""
    if "/" in name or name in ("", ".", ".."):
        raise UnsafePathError(f"{name!r} is not a plain file name")
    try:
        fd = os.open(name, flags | _OPEN_FLAGS | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the name is a symlink
            raise UnsafePathError(f"{name} is a symlink, not a file of labctl's") from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
        os.close(fd)
        raise UnsafePathError(f"{name} is not a regular file of labctl's")
    os.set_blocking(fd, True)
    return fd


def read_text(dir_fd: int, name: str) -> str | None:
    """The text of ``name`` in ``dir_fd``, or None when it does not exist."""
    try:
        fd = open_file(dir_fd, name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8") as f:
        return f.read()


def write_atomically(dir_fd: int, name: str, text: str) -> None:
    """Replace ``name`` in ``dir_fd`` with ``text`` (a reader sees the old or the new file, whole)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = open_file(dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


@contextlib.contextmanager
def locked_json(path: str) -> Iterator[dict[str, Any]]:
    """Yield the registry's contents; what the body leaves in it is written back atomically.

    Only when it differs from what was read: every ``down`` releases its lab's overrides and modules,
    mostly from empty registries, and a rewrite is a file created and renamed (0.2-1 ms each here).
    """
    dir_fd = open_dir(os.path.dirname(path))
    name = os.path.basename(path)
    try:
        lock = open_file(dir_fd, name + ".lock", os.O_RDWR | os.O_CREAT)
        with os.fdopen(lock, "r+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            text = read_text(dir_fd, name)
            try:
                data: dict[str, Any] = json.loads(text or "{}")
            except json.JSONDecodeError:
                data = {}
            if not isinstance(data, dict):
                data = {}
            yield data
            written = json.dumps(data, indent=2, sort_keys=True)
            if written != (text if text is not None else "{}"):
                write_atomically(dir_fd, name, written)
    finally:
        os.close(dir_fd)
