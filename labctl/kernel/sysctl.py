"""sysctl reads and writes, per namespace, plus crash-safe global overrides.

Most ``net.*`` sysctls are per network namespace: writing them with the thread
inside a lab namespace touches only that lab.  A few (``net.core.netdev_max_backlog``,
``net.netfilter.nf_log_all_netns``, ``net.core.rps_sock_flow_entries``) are global,
so changing them changes the host; :class:`GlobalOverrides` records the original
value on disk *before* writing and puts it back when the last owner releases it,
so a ``kill -9`` between the two still lets ``down``/``clean`` restore it.
"""

from __future__ import annotations

import os
from typing import Any

from labctl.kernel import netns
from labctl.kernel.registry import STATE_DIR, locked_json

GLOBALS_FILE = os.path.join(STATE_DIR, "globals.json")

# sysctls that are not namespaced: a write from any namespace changes the host.
GLOBAL_KEYS = frozenset(
    {
        "net.core.netdev_max_backlog",
        "net.core.rps_sock_flow_entries",
        "net.core.dev_weight",
        "net.core.netdev_budget",
        "net.core.netdev_budget_usecs",
        "net.core.rmem_max",
        "net.core.wmem_max",
        "net.core.rmem_default",
        "net.core.wmem_default",
        "net.netfilter.nf_log_all_netns",
    }
)


class SysctlError(RuntimeError):
    """A sysctl does not exist or refused the value."""


def proc_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def is_global(key: str) -> bool:
    return key in GLOBAL_KEYS


def _read_here(key: str) -> str:
    try:
        with open(proc_path(key)) as f:
            return f.read().strip()
    except FileNotFoundError as exc:
        raise SysctlError(f"no such sysctl: {key}") from exc


def _write_here(key: str, value: str) -> None:
    try:
        with open(proc_path(key), "w") as f:
            f.write(value)
    except FileNotFoundError as exc:
        raise SysctlError(f"no such sysctl: {key}") from exc
    except OSError as exc:
        raise SysctlError(f"sysctl {key}={value!r} refused: {exc.strerror}") from exc


def read(key: str, namespace: str | None = None) -> str:
    """Read ``key`` as seen from ``namespace`` (the caller's own when None)."""
    if namespace is None:
        return _read_here(key)
    with netns.entered(namespace):
        return _read_here(key)


def write_here(settings: dict[str, str]) -> None:
    """Write namespaced sysctls in the calling thread's namespace (see netns.entered)."""
    for key in settings:
        if is_global(key):
            raise SysctlError(f"{key} is global, not per namespace; set it as a lab-wide sysctl")
    for key, value in settings.items():
        _write_here(key, value)


def write_many(settings: dict[str, str], namespace: str) -> None:
    """Write namespaced sysctls inside ``namespace`` with one namespace switch."""
    with netns.entered(namespace):
        write_here(settings)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class GlobalOverrides:
    """Host-wide sysctls changed on behalf of an owner (a lab or a trace session).

    The registry file maps each key to its original value and the owners that
    hold an override.  The original is written before the kernel value changes
    and restored when the last owner releases, in any process, after any crash.
    """

    @staticmethod
    def acquire(owner: str, key: str, value: Any) -> None:
        if not is_global(key):
            raise SysctlError(f"{key} is per namespace, not global")
        text = format_value(value)
        # the original is on disk before the kernel value changes, so a kill -9 between the two is undoable
        with locked_json(GLOBALS_FILE) as registry:
            entry = registry.setdefault(key, {"original": _read_here(key), "owners": {}})
            entry["owners"][owner] = text
        with locked_json(GLOBALS_FILE):
            _write_here(key, text)

    @staticmethod
    def release(owner: str) -> dict[str, str]:
        """Drop every override of ``owner``; returns the keys restored to the original."""
        restored: dict[str, str] = {}
        with locked_json(GLOBALS_FILE) as registry:
            for key in list(registry):
                entry = registry[key]
                if entry["owners"].pop(owner, None) is None:
                    continue
                if entry["owners"]:
                    # another owner still holds it: keep the most recent remaining value
                    _write_here(key, list(entry["owners"].values())[-1])
                else:
                    _write_here(key, entry["original"])
                    restored[key] = entry["original"]
                    del registry[key]
        return restored

    @staticmethod
    def release_matching(predicate: Any) -> dict[str, str]:
        """Release every owner for which ``predicate(owner)`` is true (used by ``clean``)."""
        with locked_json(GLOBALS_FILE) as registry:
            owners = {o for entry in registry.values() for o in entry["owners"]}
        restored: dict[str, str] = {}
        for owner in sorted(owners):
            if predicate(owner):
                restored.update(GlobalOverrides.release(owner))
        return restored

    @staticmethod
    def owners() -> dict[str, list[str]]:
        with locked_json(GLOBALS_FILE) as registry:
            return {key: sorted(entry["owners"]) for key, entry in registry.items()}
