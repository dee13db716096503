"""The tracefs mount and labctl's instances in it: create names, list, remove (also a killed process's).

Each session gets a private tracefs instance so that its buffer, clock, filters and enabled events never
disturb another session or a human running ``trace-cmd``; the instance is named ``labctl-<pid>-<n>`` so that
``labctl clean`` can remove the ones a killed process left behind.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import time

from labctl.errors import KernelError
from labctl.kernel import procs

TRACEFS = "/sys/kernel/tracing"
INSTANCE_PREFIX = "labctl-"
"""Every tracefs instance labctl creates starts with this; ``clean`` relies on it."""


_RMDIR_ATTEMPTS = 20


class TraceError(KernelError, RuntimeError):
    """tracefs is unusable, or refused a setting (bad filter, buffer size …): a message, never a traceback."""


def ensure_mounted(root: str = TRACEFS) -> str:
    """Mount tracefs if absent; it stays mounted (a pseudo-fs, the one host change we make)."""
    if os.path.isdir(os.path.join(root, "instances")):
        return root
    try:
        _mount_tracefs(root)
    except OSError as exc:
        raise TraceError(f"cannot mount tracefs at {root}: {exc}") from exc
    if not os.path.isdir(os.path.join(root, "instances")):
        raise TraceError(f"tracefs at {root} has no instances directory")
    return root


def _mount_tracefs(root: str) -> None:
    import ctypes

    from labctl.kernel.netns import LIBC

    if LIBC.mount(b"nodev", root.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise OSError(err, os.strerror(err), root)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _instances_dir() -> str:
    return os.path.join(ensure_mounted(), "instances")


def _instance_pid(name: str) -> int | None:
    match = re.fullmatch(re.escape(INSTANCE_PREFIX) + r"(\d+)-\d+", name)
    return int(match.group(1)) if match else None


def _rmdir_instance(path: str) -> None:
    """rmdir an instance; the kernel says EBUSY while a reader still has a file open."""
    for attempt in range(_RMDIR_ATTEMPTS):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == _RMDIR_ATTEMPTS - 1:
                raise TraceError(f"cannot remove tracefs instance {path}: {exc}") from exc
            time.sleep(0.05)


def list_instances() -> list[str]:
    """Names of the labctl tracefs instances that exist now (any process)."""
    return sorted(n for n in os.listdir(_instances_dir()) if n.startswith(INSTANCE_PREFIX))


def remove_stale_instances() -> list[str]:
    """Remove labctl instances whose process is gone.

    A ``kill -9`` leaves the instance and its buffers allocated; this is what
    ``labctl clean`` calls.  Names that do not carry a pid, and instances of
    live processes (other labs tracing beside this one), are left alone.
    """
    removed = []
    for name in list_instances():
        pid = _instance_pid(name)
        stale = pid is not None and not procs.alive(pid)
        if not stale:
            continue
        try:
            _rmdir_instance(os.path.join(_instances_dir(), name))
        except TraceError:
            continue
        removed.append(name)
    return removed


_counter = itertools.count()
