"""Which tracepoints this kernel has, and the expansion of ``sys:name`` / ``sys:*`` specs into them."""

from __future__ import annotations

import fnmatch
import functools
import os
from collections.abc import Iterable

from labctl.kernel.tracefs.instances import ensure_mounted


def available_events() -> dict[str, list[str]]:
    """Every tracepoint of this kernel, by subsystem (a copy: callers may change it)."""
    return {system: list(names) for system, names in _available_events(ensure_mounted()).items()}


@functools.cache
def _available_events(tracefs_root: str) -> dict[str, list[str]]:
    """Read once per process: walking events/ costs 60 ms a check, and the set of tracepoints
    of a kernel without module loading never changes while it runs (this one has none)."""
    root = os.path.join(tracefs_root, "events")
    result: dict[str, list[str]] = {}
    for system in sorted(os.listdir(root)):
        names = _system_events(tracefs_root, system)
        if names:
            result[system] = names
    return result


@functools.cache
def _system_events(tracefs_root: str, system: str) -> list[str]:
    """The tracepoints of one subsystem ([] when there is no such subsystem), read once per process."""
    sysdir = os.path.join(tracefs_root, "events", system)
    if not os.path.isdir(sysdir):
        return []
    return [n for n in sorted(os.listdir(sysdir)) if os.path.isfile(os.path.join(sysdir, n, "format"))]


def resolve_events(specs: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Expand ``sys:name`` / ``sys:*`` specs into existing events.

    Returns (``sys:name`` list in request order, {spec: why it was skipped}).
    Tracepoints come and go between kernel releases; a lab asks for what it
    would like and reports what this kernel could not give.
    """
    root = ensure_mounted()
    enabled: list[str] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        system, sep, pattern = spec.partition(":")
        if not sep or not system or not pattern:
            skipped[spec] = "not of the form system:event"
            continue
        # only the named subsystems are listed: walking all ~100 of events/ cost a one-packet trace 15 ms
        known = _system_events(root, system) if "/" not in system and system not in (".", "..") else []
        if not known:
            skipped[spec] = f"no tracepoint subsystem {system!r} on this kernel"
            continue
        names = fnmatch.filter(known, pattern)
        if not names:
            skipped[spec] = f"no tracepoint {spec} on this kernel"
            continue
        for name in names:
            key = f"{system}:{name}"
            if key not in enabled:
                enabled.append(key)
    return enabled, skipped
