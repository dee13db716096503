"""What /proc says about a process: alive, its owner, its start time, its command line.

A pid alone names a process only until it exits and the number is reused;
a pid together with its start time (field 22 of /proc/PID/stat, clock ticks
since boot) names one process for the whole uptime.  Owners are read from
/proc/PID/status, so a process another user started is never mistaken for
one of labctl's root helpers.
"""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while a process with this pid exists (any owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold ") ": split after the last one
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def uids(pid: int) -> tuple[int, ...] | None:
    """Real, effective, saved and filesystem uid of the process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return tuple(int(part) for part in line.split()[1:])
    except OSError:
        return None
    return None


def owned_by_root(pid: int) -> bool:
    """True when every uid of the process is 0: only root can have started it (or made it so)."""
    found = uids(pid)
    return found is not None and all(uid == 0 for uid in found)


def cmdline(pid: int) -> list[str]:
    """The process's argv ([] when it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (children of each of its threads, recursively; CONFIG_PROC_CHILDREN)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = {int(c) for c in f.read().split()}
            except (OSError, ValueError):
                continue
            todo += [c for c in children if c not in found]
            found |= children
    return found
