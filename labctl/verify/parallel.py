"""Several labs at once: ``labctl run -j N`` and ``pytest -n N`` (pytest-xdist) over lab files.

Why it is safe.  Each lab runs in a process of its own, and evidence is
attributed to the tasks of the process that runs a check
(labctl/evidence/attribution.py) and read per namespace (counters, the
settle's quiet test): two labs traced at the same moment do not adopt each
other's packets, even with the same device names and addresses.  What
attribution cannot separate is host-wide state, so

* a lab that sets a host-wide sysctl (``net.core.netdev_max_backlog`` changes
  every namespace's backlog, the other lab's included) runs from its ``up`` to
  its ``down`` while no other lab does anything;
* a check that judges host-wide evidence (an expectation kind with
  ``host_wide``: softnet_stat is per CPU, shared by every namespace) or is
  marked ``alone: true`` (its verdict is timing another lab's load would
  change, like a rate-limited qdisc's drop count) runs while no other lab
  builds, runs a check or tears down -- the other labs stay up, idle.

:class:`RunLock` enforces that across processes: every phase of a lab (its
``up``, each check, its ``down``) holds it shared, a phase that must run alone
holds it exclusively, and a waiting exclusive holder keeps new shared holders
out, so it is not starved.  A check that must run alone therefore waits at
most for the checks running at that moment, not for whole labs.  The
mutation suite (labctl/verify/mutate.py) schedules its own ``alone`` labs the
same way.

Why more labs than cores.  A run is mostly waiting -- for the kernel's timers
(a SYN retransmission), tracefs instances, ping's reply timeout -- so ``-j``
can exceed the core count: ``-j auto`` is :func:`auto_jobs`.  The longest labs
start first (each lab's last duration is kept in /run/labctl/runs), so the
run does not end with one long lab on its own.
"""

from __future__ import annotations

import contextlib
import copyreg
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from labctl.errors import KernelLacksError, LabctlError
from labctl.kernel import registry
from labctl.topology.checks import Check, LabFile
from labctl.verify.results import LabResult
from labctl.verify.scope import load_lab_file, selected
from labctl.verify.workers import start_fork_server, stop_fork_server

RUNS_DIR = os.path.join(registry.STATE_DIR, "runs")


def _mapping_proxy(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


# A lab's results travel from its worker process as a pickle; the evidence keeps read-only views
# (MappingProxyType), which pickle cannot copy: they are sent as dicts and made read-only again.
copyreg.pickle(MappingProxyType, lambda view: (_mapping_proxy, (dict(view),)))


def lab_alone_reason(lab: LabFile) -> str | None:
    """Why ``lab`` must be the only lab doing anything from its up to its down, or None."""
    if lab.sysctls:
        return f"it sets host-wide {', '.join(sorted(lab.sysctls))}"
    return None


def check_alone_reason(check: Check) -> str | None:
    """Why ``check`` must run while no other lab of the run acts, or None."""
    from labctl.expect.base import kinds

    if check.alone:
        return f"check {check.name} says alone: true"
    stated = [key for key, kind in kinds().items() if kind.host_wide and getattr(check.expect, key) is not None]
    if stated:
        return f"check {check.name} judges host-wide {', '.join(stated)}"
    return None


def alone_reason(lab: LabFile, select: str | None = None) -> str | None:
    """Why ``lab`` (its selected checks) needs the machine to itself at some point, or None."""
    reason = lab_alone_reason(lab)
    for check in selected(lab, select):
        reason = reason or check_alone_reason(check)
    return reason


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

    def turns(self, lab: LabFile) -> Turns:
        return Turns(self, lab_alone_reason(lab) is not None)

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


class Turns:
    """When one lab of a run may act (see the module's docstring); :func:`labctl.verify.runner.run_lab` asks.

    ``whole``: the lab holds the lock exclusively from before its up to after its down (:meth:`lab`), and
    its phases take nothing more.  Otherwise each phase takes the lock for itself (:meth:`phase`):
    exclusively for a check that must run alone, shared for the rest.
    """

    def __init__(self, lock: RunLock, whole: bool) -> None:
        self.lock = lock
        self.whole = whole

    @contextlib.contextmanager
    def lab(self) -> Iterator[None]:
        if self.whole:
            with self.lock.held(alone=True):
                yield
        else:
            yield

    @contextlib.contextmanager
    def phase(self, check: Check | None = None) -> Iterator[None]:
        if self.whole:
            yield
        else:
            with self.lock.held(alone=check is not None and check_alone_reason(check) is not None):
                yield


def new_run_name() -> str:
    return f"run-{os.getpid()}-{time.time_ns()}"


def auto_jobs(labs: int, cores: int | None = None) -> int:
    """``-j auto``: labs at a time -- :data:`JOBS_PER_CORE` per core (a run is mostly waiting), at most the
    number of labs."""
    return max(1, min(labs, JOBS_PER_CORE * (cores or os.cpu_count() or 1)))


JOBS_PER_CORE = 3
"""A serial run of labs/ is ~8.6 s of CPU in ~58 s on an idle 2-core machine, so 6 labs at a time still
leave CPU idle; measured at load average 6-10 (README, Benchmarks), -j auto took 40-56 s where the serial
run took 67-89 s.  When other users already hold the cores, -j beyond them buys nothing."""


def parse_jobs(text: str, labs: int) -> int:
    """``-j`` as given: a positive number or ``auto``; ValueError otherwise."""
    if text == "auto":
        return auto_jobs(labs)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"-j takes a positive number or auto, not {text!r}")
    return int(text)


DURATIONS = os.path.join(RUNS_DIR, "durations.json")
"""Each lab file's last duration (seconds, by absolute path): the longest labs start first."""


def _last_durations() -> dict[str, float]:
    dir_fd = registry.open_dir(RUNS_DIR)
    try:
        text = registry.read_text(dir_fd, os.path.basename(DURATIONS))
    finally:
        os.close(dir_fd)
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)} if isinstance(data, dict) else {}


def _remember_durations(results: list[LabResult]) -> None:
    with registry.locked_json(DURATIONS) as data:
        for result in results:
            if result.checks and not result.error:
                data[os.path.abspath(result.file)] = round(result.seconds, 3)


@dataclass(frozen=True)
class LabJob:
    """What a worker needs to run one lab file (plain values: it crosses a process boundary)."""

    file: str
    run: str
    select: str | None = None
    keep: bool = False
    reuse: bool = False
    pcap_dir: str | None = None
    observations: bool = True
    """Keep each check's Evidence as plain data (``CheckResult.observation``: --json, --junit); see
    :func:`labctl.verify.runner.run_check`."""
    evidence: bool = False
    """Send each check's Evidence back (``CheckResult.recorded``, for an HTML report).  Otherwise it stays in
    the worker: a result crosses to labctl as a pickle, and rx-backlog's 10000 traced packets alone made
    18 MB of the 25 MB a run of labs/ pickled and unpickled -- 2 s of CPU."""


def run_one(job: LabJob) -> tuple[LabResult, int | None]:
    """Run one lab under the run's lock; a labctl error becomes the result's ``error`` and its exit code.

    Interrupted (Ctrl-C, or SIGTERM when labctl is gone: :func:`worker_starts`), the lab comes down on the way
    out and the worker exits without a result: there is nobody to report to, and no traceback to print."""
    global _running_a_lab
    _running_a_lab = True
    try:
        return _run_one(job)
    except KeyboardInterrupt:
        os._exit(130)
    finally:
        _running_a_lab = False


def _run_one(job: LabJob) -> tuple[LabResult, int | None]:
    from labctl.verify.runner import run_lab  # a worker's, imported by the fork server (WORKER_PRELOAD)

    try:
        try:
            lab = load_lab_file(job.file)
        except KernelLacksError:  # nothing is built: run_lab reports every check as not provable here
            return run_lab(job.file, select=job.select, keep=job.keep, reuse=job.reuse), None
        turns = RunLock(job.run).turns(lab)
        result = run_lab(
            job.file,
            select=job.select,
            keep=job.keep,
            reuse=job.reuse,
            pcap_dir=job.pcap_dir,
            turns=turns,
            loaded=lab,
            observations=job.observations,
        )
        if not job.evidence:
            for check in result.checks:
                check.recorded = None
        return result, None
    except LabctlError as exc:  # one broken lab must not cost the report of the others
        return LabResult(lab=Path(job.file).stem, file=job.file, error=str(exc)), exc.exit_code


def worker_starts() -> None:
    """A lab worker's first act: end with the run.  ``kill -9`` of labctl does not end a worker by itself: its
    parent is the fork server, which lives while any worker holds the server's liveness pipe -- and every
    worker does -- so each would finish its lab and then wait forever for work, the server beside it.

    A thread watches labctl (the worker's ``parent_process`` sentinel: the pipe labctl waits on for this
    worker breaks when labctl is gone) and then sends the worker SIGTERM, which unwinds it like Ctrl-C (as
    ``labctl`` itself does): the lab it was running comes down, its trace instance goes, and it exits.
    """
    import multiprocessing
    import signal
    import threading
    from multiprocessing.connection import wait

    def interrupt(signum: int, frame: object) -> None:
        if not _running_a_lab:
            os._exit(0)  # waiting for work that will never come: nothing to unwind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    labctl = multiprocessing.parent_process()
    if labctl is None:
        return

    def watch() -> None:
        wait([labctl.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="labctl-watch", daemon=True).start()


_running_a_lab = False
"""Whether this worker is inside :func:`run_one` (a SIGTERM then unwinds the lab; otherwise it just exits)."""


def run_labs(
    files: list[str],
    jobs: int,
    select: str | None = None,
    keep: bool = False,
    reuse: bool = False,
    on_progress: Callable[[str], None] | None = None,
    pcap_dir: str | None = None,
    evidence: bool = False,
    observations: bool = True,
) -> tuple[list[LabResult], bool]:
    """Run ``files``, ``jobs`` labs at a time, each in a worker process; results in ``files`` order.

    ``evidence``: the checks' results carry their Evidence (``recorded``, what an HTML report draws);
    without it they carry verdicts, observations and pcap paths (:attr:`LabJob.evidence`).  ``observations``:
    the checks' Evidence as plain data, for --json and --junit (:attr:`LabJob.observations`).

    Returns the results and whether some file was bad input (exit 2).  Labs
    that must run alone from up to down start first; then the longest labs
    (their last duration; a lab never run counts as one second per check),
    so the run ends with short labs, not one long lab on its own.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    run = new_run_name()
    done: dict[str, tuple[LabResult, int | None]] = {}
    drained = False
    try:
        context = start_fork_server()  # the server imports the lab code while this process orders the labs
        try:
            durations = _last_durations()
        except OSError:
            durations = {}
        order = sorted(files, key=lambda f: _sort_key(f, select, durations))
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=worker_starts) as pool:
            submitted = [
                LabJob(f, run, select, keep, reuse, pcap_dir, observations=observations, evidence=evidence)
                for f in order
            ]
            pending = {pool.submit(run_one, job): job.file for job in submitted}
            while pending:
                if on_progress:
                    on_progress(f"{len(done)} of {len(files)} labs done, {min(jobs, len(pending))} running")
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[pending.pop(future)] = future.result()
        drained = True
    finally:
        stop_fork_server(drained)
        RunLock(run).remove()
    results = [done[f][0] for f in files]
    with contextlib.suppress(OSError):
        _remember_durations(results)
    return results, any(done[f][1] == 2 for f in files)


def _sort_key(file: str, select: str | None, durations: dict[str, float]) -> tuple[int, float, str]:
    try:
        lab = load_lab_file(file)
    except LabctlError:
        return (1, 0.0, file)
    seconds = durations.get(os.path.abspath(file), float(len(selected(lab, select))))
    return (0 if lab_alone_reason(lab) is not None else 1, -seconds, file)
