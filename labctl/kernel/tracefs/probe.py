"""Probe (once per boot) whether this kernel empties ``%s`` in trace output once pointer hashing is off."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess

from labctl.errors import UnsafePathError
from labctl.kernel.tracefs.instances import INSTANCE_PREFIX, _counter, _instances_dir, _read, _rmdir_instance, _write

PROBES_FILE = "tracefs-probes.json"
"""Answers of :func:`hashing_off_breaks_strings` per boot, in labctl's state directory (/run/labctl)."""


@functools.cache
def hashing_off_breaks_strings() -> bool:
    """Whether this kernel prints every ``%s`` of trace output empty once pointer hashing is off.

    Kernels 5.11 to 6.12 without Steven Rostedt's fix "tracing: Fix trace output when pointer hash is
    disabled" (Dec 2024, Fixes: efbbdaa22bb78; Debian's 6.1.176 among them): with ``nohash-ptr``,
    trace_event_format() writes the ``%px`` copy of the format into ``iter->fmt``, and trace_check_vprintf()
    then uses that same buffer as scratch for each ``%s`` -- ``dev=`` and ``reason:`` come out empty.  Probed
    (a fork traced in a throw-away instance), never assumed from a version.

    The answer belongs to the running kernel, so it is kept for this boot (keyed by its boot_id) in
    /run/labctl: the probe's instance costs 0.04-0.06 s of wall time (its rmdir waits for the kernel),
    a tenth of a one-packet ``labctl trace`` in a new process.
    """
    boot = _boot_id()
    known = _recorded_probe(boot)
    if known is not None:
        return known
    answer = _probe_hashing_off_breaks_strings()
    _record_probe(boot, answer)
    return answer


def _boot_id() -> str:
    try:
        return _read("/proc/sys/kernel/random/boot_id").strip()
    except OSError:
        return ""


def _recorded_probe(boot: str) -> bool | None:
    """The answer recorded during this boot, or None (none yet, another boot's, or unreadable)."""
    import json

    from labctl.kernel import registry

    if not boot:
        return None
    try:
        dir_fd = registry.open_dir(registry.STATE_DIR)
    except (OSError, UnsafePathError):
        return None
    try:
        data = json.loads(registry.read_text(dir_fd, PROBES_FILE) or "{}")
    except (OSError, UnsafePathError, ValueError):
        return None
    finally:
        os.close(dir_fd)
    answer = data.get("hashing_off_breaks_strings") if isinstance(data, dict) and data.get("boot_id") == boot else None
    return answer if isinstance(answer, bool) else None


def _record_probe(boot: str, answer: bool) -> None:
    """Keep the answer for this boot; a state directory that cannot be written only costs the next probe."""
    import json

    from labctl.kernel import registry

    if not boot:
        return
    with contextlib.suppress(OSError, UnsafePathError):
        dir_fd = registry.open_dir(registry.STATE_DIR)
        try:
            text = json.dumps({"boot_id": boot, "hashing_off_breaks_strings": answer})
            registry.write_atomically(dir_fd, PROBES_FILE, text)
        finally:
            os.close(dir_fd)


def _probe_hashing_off_breaks_strings() -> bool:
    """Trace a fork with ``nohash-ptr`` in a throw-away instance: are its ``%s`` strings empty?"""
    path = os.path.join(_instances_dir(), f"{INSTANCE_PREFIX}{os.getpid()}-{next(_counter)}")
    event = os.path.join(path, "events", "sched", "sched_process_fork", "enable")
    os.mkdir(path)
    try:
        if not os.path.exists(event):
            return False
        _write(os.path.join(path, "trace_options"), "nohash-ptr")
        _write(event, "1")
        subprocess.run(["true"], check=False)
        _write(event, "0")
        text = _read(os.path.join(path, "trace"))
    finally:
        _rmdir_instance(path)
    return "sched_process_fork: comm= " in text and not re.search(r"sched_process_fork: comm=\S", text)
