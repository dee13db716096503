"""Run a program inside a node, bounded in time and output: the ``exec`` step's engine.

The child enters the node's network namespace with a sysfs of its own (as
``labctl exec`` and ``ip netns exec`` do, so ``/sys/class/net`` shows the
node's devices), in a session of its own so a timeout kills the whole process
group.  Output is read as it comes and only the first ``limit`` bytes of each
stream are kept: a chatty or endless program can neither exhaust memory nor
hang the check.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from labctl.kernel.procs import descendants
from labctl.kernel.sysfs import enter_with_own_sysfs

OUTPUT_LIMIT = 64 * 1024
FOLLOW_SECONDS = 0.02


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit: int | None
    """The exit status (negative: killed by that signal); None when the program never ran or timed out."""
    stdout: str
    stderr: str
    seconds: float
    error: str | None = None
    """Why it could not do what it said: not found, not executable, timed out."""
    pid: int | None = None


def _enter(namespace: str) -> None:  # runs in the child, between fork and exec
    enter_with_own_sysfs(namespace)


def run_in_node(
    namespace: str,
    argv: Sequence[str],
    timeout: float,
    limit: int = OUTPUT_LIMIT,
    started: Callable[[set[int]], None] | None = None,
) -> CommandResult:
    """Run ``argv`` in ``namespace``; kill it (and its group) at ``timeout``.

    ``started`` gets the program's pid at once, then the pids of the processes it starts (a shell's
    commands) as they are seen, every ``FOLLOW_SECONDS``: they act for the step too.
    """
    begin = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=partial(_enter, namespace),
            start_new_session=True,
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return CommandResult(tuple(argv), None, "", "", time.monotonic() - begin, f"cannot run {argv[0]}: {reason}")
    followed = {proc.pid}
    if started is not None:
        started({proc.pid})
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept: dict[int, bytearray] = {}
    streams = {}
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        kept[stream.fileno()] = bytearray()
        streams[stream.fileno()] = stream
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    deadline = begin + timeout
    timed_out = False
    while streams:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if started is not None:
            fresh = descendants(proc.pid) - followed
            if fresh:
                followed |= fresh
                started(fresh)
            left = min(left, FOLLOW_SECONDS)
        for fd, _ in poller.poll(int(left * 1000) + 1):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                poller.unregister(fd)
                streams.pop(fd).close()
                continue
            room = limit - len(kept[fd])
            if room > 0:
                kept[fd] += chunk[:room]
    if not timed_out:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for stream in streams.values():
        stream.close()
    out, err = kept[out_fd].decode(errors="replace"), kept[err_fd].decode(errors="replace")
    seconds = time.monotonic() - begin
    if timed_out:
        return CommandResult(tuple(argv), None, out, err, seconds, f"timed out after {timeout:g} s (killed)", proc.pid)
    return CommandResult(tuple(argv), proc.returncode, out, err, seconds, None, proc.pid)
