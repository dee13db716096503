"""Several labs at once: ``labctl run -j N`` and ``pytest -n N`` (pytest-xdist) over lab files.

Why it is safe.  Each lab runs in a process of its own, and evidence is
attributed to the tasks of the process that runs a check
(labctl/evidence/attribution.py): two labs traced at the same moment do not
adopt each other's packets, even with the same device names and addresses.
What attribution cannot separate is host-wide state, so a lab that

* sets a host-wide sysctl (``net.core.netdev_max_backlog`` changes every
  namespace's backlog, the other lab's included),
* judges host-wide evidence (an expectation kind with ``host_wide``:
  softnet_stat is per CPU, shared by every namespace), or
* has a check marked ``alone: true`` (its verdict is timing another lab's
  load would change, like a rate-limited qdisc's drop count)

runs while no other lab of the run does.  :class:`RunLock` enforces that
across processes: a lab holds it shared, a lab that must run alone holds it
exclusively, and a waiting exclusive holder keeps new shared holders out, so
it is not starved.  The mutation suite (labctl/verify/mutate.py) schedules
its own ``alone`` labs the same way.
"""

from __future__ import annotations

import contextlib
import copyreg
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from labctl.errors import KernelLacksError, LabctlError
from labctl.kernel import registry
from labctl.topology.checks import LabFile
from labctl.verify.runner import LabResult, load_lab_file, run_lab, selected

RUNS_DIR = os.path.join(registry.STATE_DIR, "runs")


def _mapping_proxy(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


# A lab's results travel from its worker process as a pickle; the evidence keeps read-only views
# (MappingProxyType), which pickle cannot copy: they are sent as dicts and made read-only again.
copyreg.pickle(MappingProxyType, lambda view: (_mapping_proxy, (dict(view),)))


def alone_reason(lab: LabFile, select: str | None = None) -> str | None:
    """Why ``lab`` (its selected checks) must run while no other lab runs, or None."""
    from labctl.expect.base import kinds

    if lab.sysctls:
        return f"it sets host-wide {', '.join(sorted(lab.sysctls))}"
    host_wide = [key for key, kind in kinds().items() if kind.host_wide]
    for check in selected(lab, select):
        if check.alone:
            return f"check {check.name} says alone: true"
        stated = [key for key in host_wide if getattr(check.expect, key) is not None]
        if stated:
            return f"check {check.name} judges host-wide {', '.join(stated)}"
    return None


class RunLock:
    """A shared/exclusive lock of one run, held by the processes that run its labs.

    Two flock(2) files in /run/labctl/runs: ``NAME.lock`` (shared for a lab,
    exclusive for a lab that must run alone) and ``NAME.gate``, which an
    exclusive taker holds while it waits so that no new shared holder slips
    in.  Locks die with their process, so a killed worker never leaves the
    run stuck.
    """

    def __init__(self, name: str) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad run name {name!r}")
        self.name = name

    @contextlib.contextmanager
    def held(self, alone: bool) -> Iterator[None]:
        dir_fd = registry.open_dir(RUNS_DIR)
        try:
            gate = registry.open_file(dir_fd, f"{self.name}.gate", os.O_RDWR | os.O_CREAT)
            lock = registry.open_file(dir_fd, f"{self.name}.lock", os.O_RDWR | os.O_CREAT)
        finally:
            os.close(dir_fd)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)
            yield
        finally:
            os.close(lock)  # releases the flock
            os.close(gate)

    def remove(self) -> None:
        """Delete the run's lock files (the run is over: nobody holds them)."""
        with contextlib.suppress(OSError):
            dir_fd = registry.open_dir(RUNS_DIR)
            try:
                for suffix in (".gate", ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.name}{suffix}", dir_fd=dir_fd)
            finally:
                os.close(dir_fd)


def new_run_name() -> str:
    return f"run-{os.getpid()}-{time.time_ns()}"


@dataclass(frozen=True)
class LabJob:
    """What a worker needs to run one lab file (plain values: it crosses a process boundary)."""

    file: str
    run: str
    select: str | None = None
    keep: bool = False
    reuse: bool = False
    pcap_dir: str | None = None


def run_one(job: LabJob) -> tuple[LabResult, int | None]:
    """Run one lab under the run's lock; a labctl error becomes the result's ``error`` and its exit code."""
    try:
        try:
            lab = load_lab_file(job.file)
        except KernelLacksError:  # nothing is built: run_lab reports every check as not provable here
            return run_lab(job.file, select=job.select, keep=job.keep, reuse=job.reuse), None
        with RunLock(job.run).held(alone=alone_reason(lab, job.select) is not None):
            result = run_lab(job.file, select=job.select, keep=job.keep, reuse=job.reuse, pcap_dir=job.pcap_dir)
            return result, None
    except LabctlError as exc:  # one broken lab must not cost the report of the others
        return LabResult(lab=Path(job.file).stem, file=job.file, error=str(exc)), exc.exit_code


def run_labs(
    files: list[str],
    jobs: int,
    select: str | None = None,
    keep: bool = False,
    reuse: bool = False,
    on_progress: Callable[[str], None] | None = None,
    pcap_dir: str | None = None,
) -> tuple[list[LabResult], bool]:
    """Run ``files``, ``jobs`` labs at a time, each in a worker process; results in ``files`` order.

    Returns the results and whether some file was bad input (exit 2).  Labs
    that must run alone are started first, so the run ends with the labs
    that share the machine instead of one long lab on its own.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    run = new_run_name()
    order = sorted(files, key=lambda f: _sort_key(f, select))
    done: dict[str, tuple[LabResult, int | None]] = {}
    try:
        # spawn, not fork: the parent has threads (the progress spinner) and open netlink sockets
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(run_one, LabJob(f, run, select, keep, reuse, pcap_dir)): f for f in order}
            while pending:
                if on_progress:
                    on_progress(f"{len(done)} of {len(files)} labs done, {min(jobs, len(pending))} running")
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[pending.pop(future)] = future.result()
    finally:
        RunLock(run).remove()
    results = [done[f][0] for f in files]
    return results, any(done[f][1] == 2 for f in files)


def _sort_key(file: str, select: str | None) -> tuple[int, str]:
    try:
        alone = alone_reason(load_lab_file(file), select) is not None
    except LabctlError:
        alone = False
    return (0 if alone else 1, file)
