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
import re
import shutil
import subprocess
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


NOT_PER_NODE: dict[str, str] = {
    "net.netfilter.nf_hooks_lwtunnel": (
        "a one-way switch: once on, this kernel cannot turn it off again, and it turns on"
        " lightweight-tunnel netfilter hooks for every namespace of the host"
    ),
    "net.netfilter.nf_conntrack_max": "host-wide: one conntrack table limit for every namespace",
    "net.netfilter.nf_conntrack_buckets": "host-wide: the size of the conntrack hash every namespace shares",
    "net.netfilter.nf_log_all_netns": "host-wide: it makes every namespace log to the host's log",
    "net.ipv4.tcp_mem": "host-wide: TCP memory limits of the whole host",
    "net.ipv4.udp_mem": "host-wide: UDP memory limits of the whole host",
    "net.ipv4.tcp_allowed_congestion_control": "host-wide: the list every namespace may choose from",
}
"""Sysctls under net.* that a node could write but that are not really its own.

Visible (and sometimes writable) inside a namespace, they change the host
for every namespace, or cannot be undone: refused per node, whatever the
kernel's probe says.
"""

_PER_INTERFACE_RE = re.compile(r"net\.(ipv4|ipv6)\.(conf|neigh)\.([^.]+)\.(.+)")


class SysctlError(RuntimeError):
    """A sysctl does not exist or refused the value."""


_KEY_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+")


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a sysctl name (words joined by dots); it becomes a path under /proc/sys."""
    if not _KEY_RE.fullmatch(key):
        return f"{key!r} is not a sysctl name (words of letters, digits, - and _ joined by dots)"
    return None


def proc_path(key: str) -> str:
    """The /proc/sys file of ``key``; a key that could climb out of /proc/sys is refused."""
    problem = key_problem(key)
    if problem is not None:
        raise SysctlError(problem)
    return "/proc/sys/" + key.replace(".", "/")


def is_global(key: str) -> bool:
    return key in GLOBAL_KEYS


def interface_of(key: str) -> tuple[str, str] | None:
    """(interface, the same key of ``lo``) for a per-interface key such as net.ipv4.conf.eth0.rp_filter.

    ``lo`` is in every namespace and has every per-interface key (``default``
    has no neigh table outside the host's namespace), so it stands for an
    interface that does not exist yet.
    """
    match = _PER_INTERFACE_RE.fullmatch(key)
    if match is None:
        return None
    family, table, ifname, rest = match.groups()
    return ifname, f"net.{family}.{table}.lo.{rest}"


def probe_fresh_namespace(keys: list[str]) -> dict[str, str] | None:
    """How a brand-new network namespace sees each key: "writable", "read-only" or "missing".

    A node's sysctls are written in its own namespace, where a key that is
    global (net.core.netdev_max_backlog) does not exist and one that is
    shared may be read-only.  The probe runs ``unshare --net`` -- a namespace
    without a name, gone when the probe exits -- so nothing is built and
    nothing is left.  None when it cannot run (not root, no unshare).
    """
    unshare = shutil.which("unshare")
    if not keys or unshare is None or os.geteuid() != 0:
        return None
    script = 'for p; do if [ -w "$p" ]; then echo w; elif [ -e "$p" ]; then echo r; else echo n; fi; done'
    paths = [proc_path(key) for key in keys]
    try:
        result = subprocess.run(
            [unshare, "--net", "--", "sh", "-c", script, "sh", *paths], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    answers = result.stdout.split()
    if result.returncode != 0 or len(answers) != len(keys):
        return None
    names = {"w": "writable", "r": "read-only", "n": "missing"}
    return {key: names[answer] for key, answer in zip(keys, answers, strict=True)}


def value_problem(key: str, value: Any, current: str | None) -> str | None:
    """Why ``value`` cannot be written to ``key``, judged by the shape of its current value ``current``.

    Integer sysctls (most of them, some with several fields like
    ip_local_port_range) take as many integers as they hold; the kernel
    would refuse anything else only once the lab is half built.
    """
    text = format_value(value)
    if not text.strip():
        return f"{key} needs a value"
    if isinstance(value, float):
        return f"{key}={value!r}: sysctls take integers or words, not decimal numbers"
    if current is None:
        return None
    fields = current.split()
    if fields and all(re.fullmatch(r"-?\d+", f) for f in fields):
        given = text.split()
        if len(given) != len(fields) or not all(re.fullmatch(r"-?\d+", g) for g in given):
            shape = "an integer" if len(fields) == 1 else f"{len(fields)} integers separated by spaces"
            return f"{key} takes {shape} (it is {' '.join(fields)!r} now), not {text!r}"
    return None


def read_host(key: str) -> str | None:
    """``key`` as the host's namespace has it, or None when it cannot be read (absent, write-only)."""
    try:
        return _read_here(key)
    except (SysctlError, OSError):
        return None


def _read_here(key: str) -> str:
    try:
        with open(proc_path(key)) as f:
            return f.read().strip()
    except FileNotFoundError as exc:
        raise SysctlError(f"no such sysctl: {key}") from exc


def _write_here(key: str, value: str) -> None:
    _write_at(None, proc_path(key), key, value)


def _write_at(dir_fd: int | None, path: str, key: str, value: str) -> None:
    """Write ``value`` to ``key``'s file ``path`` (relative to ``dir_fd``, an open /proc/sys directory, if given)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise SysctlError(f"no such sysctl: {key}") from exc
    except OSError as exc:
        raise SysctlError(f"sysctl {key}={value!r} refused: {exc.strerror}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise SysctlError(f"sysctl {key}={value!r} refused: {exc.strerror}") from exc
    finally:
        os.close(fd)


def read(key: str, namespace: str | None = None) -> str:
    """Read ``key`` as seen from ``namespace`` (the caller's own when None)."""
    if namespace is None:
        return _read_here(key)
    with netns.entered(namespace):
        return _read_here(key)


def write_here(settings: dict[str, str]) -> None:
    """Write namespaced sysctls in the calling thread's namespace (see netns.entered).

    Several keys are written relative to one open directory, their deepest common one
    (``net.ipv6.conf.all.disable_ipv6`` and ``...default...``: ``/proc/sys/net/ipv6/conf``).
    Looking up ``/proc/sys/net/<x>`` compares the name with the dentry of every namespace
    on the host that has looked it up (one hash chain, a global lock per candidate): with a
    thousand namespaces ~0.15-0.25 ms, more than the write; one lookup per call instead of
    one per key halves a converge's per-node sysctl cost (bench/bench_cli.py, second up).
    """
    for key in settings:
        if is_global(key):
            raise SysctlError(f"{key} is global, not per namespace; set it as a lab-wide sysctl")
    parts = {key: proc_path(key).split("/") for key in settings}
    if len(parts) < 2:
        for key, value in settings.items():
            _write_here(key, value)
        return
    common = min(len(split) for split in parts.values()) - 1  # a directory: never a key's own file
    first = next(iter(parts.values()))
    while any(split[:common] != first[:common] for split in parts.values()):
        common -= 1
    try:
        dir_fd = os.open("/".join(first[:common]), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # a key below it names a directory that does not exist: each key says which
        for key, value in settings.items():
            _write_here(key, value)
        return
    try:
        for key, value in settings.items():
            _write_at(dir_fd, "/".join(parts[key][common:]), key, value)
    finally:
        os.close(dir_fd)


def write_many(settings: dict[str, str], namespace: str) -> None:
    """Write namespaced sysctls inside ``namespace`` with one namespace switch."""
    with netns.entered(namespace):
        write_here(settings)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _settle(registry: dict[str, Any], key: str, restored: dict[str, str]) -> None:
    """After an owner let go of ``key``: another owner still holds it (the most recent remaining value is
    put in force), or none does (the original is written back, noted in ``restored``, and forgotten)."""
    entry = registry[key]
    if entry["owners"]:
        _write_here(key, list(entry["owners"].values())[-1])
    else:
        _write_here(key, entry["original"])
        restored[key] = entry["original"]
        del registry[key]


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
    def converge(owner: str, settings: dict[str, Any]) -> dict[str, str]:
        """Make ``owner`` hold exactly ``settings``: what ``up`` (first or again) calls.

        Unlike release-then-acquire, a key the owner keeps at the same value is
        never written back to its original in between, so a second ``up``
        leaves the host value alone; keys it no longer wants are released.
        Returns the keys restored to their original.
        """
        for key in settings:
            if not is_global(key):
                raise SysctlError(f"{key} is per namespace, not global")
        wanted = {key: format_value(value) for key, value in settings.items()}
        restored: dict[str, str] = {}
        with locked_json(GLOBALS_FILE) as registry:
            for key in list(registry):
                entry = registry[key]
                if key in wanted or owner not in entry["owners"]:
                    continue
                del entry["owners"][owner]
                _settle(registry, key, restored)
            for key, text in wanted.items():
                # the original is on disk before the kernel value changes: a kill -9 in between is undoable
                entry = registry.setdefault(key, {"original": _read_here(key), "owners": {}})
                entry["owners"].pop(owner, None)
                entry["owners"][owner] = text  # the most recent owner's value is the one in force
        for key in wanted:
            with locked_json(GLOBALS_FILE) as registry:
                owners = registry.get(key, {}).get("owners", {})
                in_force = list(owners.values())[-1] if owners else None
                if in_force is not None and _read_here(key) != in_force:
                    _write_here(key, in_force)
        return restored

    @staticmethod
    def release(owner: str) -> dict[str, str]:
        """Drop every override of ``owner``; returns the keys restored to the original."""
        restored: dict[str, str] = {}
        with locked_json(GLOBALS_FILE) as registry:
            for key in list(registry):
                entry = registry[key]
                if entry["owners"].pop(owner, None) is None:
                    continue
                _settle(registry, key, restored)
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
