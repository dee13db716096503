"""Mutation testing of lab checks: a check is only evidence if breaking its claim turns it red.

What a mutation is, and the catalogue of them, is labctl/verify/mutation.py; this module runs them.

:func:`run_mutations` builds the lab once, under a name of its own so it never
meets a copy of the same lab someone else has up, runs each original check
(the baseline: a mutation of a check that does not pass proves nothing), then
its mutants, then the original again (the control: if it no longer passes, the
check depends on state its own runs changed, and its kills cannot be trusted).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from labctl.errors import KernelLacksError, LabctlError
from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.topology.checks import LabFile
from labctl.verify.mutation import (
    InvalidMutation,
    LabMutations,
    Mutation,
    MutationError,
    mutated_lab_data,
    read_lab_data,
    validate,
)
from labctl.verify.results import CheckResult
from labctl.verify.runner import run_check

LAB_NAME_MAX = 32  # topology.model.LabName


# -- running ---------------------------------------------------------------

Outcome = Literal["killed", "survived", "invalid", "stale", "baseline-failed", "control-failed", "skipped"]


@dataclass
class MutationResult:
    """What one mutation did to its check.

    ``killed`` is the only outcome that shows the check has teeth; ``survived``
    means the mutated check still PASSed.  ``invalid``/``stale`` are catalogue
    problems, ``baseline-failed``/``control-failed`` mean the original check did
    not pass before or after its mutants, so nothing is known.  ``skipped``: the
    check cannot run on this kernel (it requires an option this kernel lacks),
    so neither can its mutants -- not provable here, not a failure.
    """

    mutation: Mutation
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0

    @property
    def killed(self) -> bool:
        return self.outcome == "killed"

    def line(self) -> str:
        m = self.mutation
        text = f"{m.check}: {m.label()} -> {self.outcome} ({m.why})"
        return text + (f": {self.detail}" if self.detail else "")


def unique_name(original: str, pid: int | None = None) -> str:
    """A lab name of this process's own, so a copy of the same lab someone else has up is never touched.

    A lab's name is only a prefix: of its namespaces (``labctl-<lab>.<node>``),
    its state file and lock, its relays' command lines and its host-wide
    sysctl ownership -- so renaming changes nothing of what the checks see.
    """
    return f"m{os.getpid() if pid is None else pid}-{original}"[:LAB_NAME_MAX]


def _skipped(result: CheckResult) -> bool:
    """The runner's 'skip' (a kernel option the check requires is missing); older runners have no status."""
    return getattr(result, "status", None) == "skip"


def _summary(result: CheckResult) -> str:
    if result.error:
        return "ERROR " + result.error.strip().splitlines()[0]
    if _skipped(result):
        return "not provable here: " + ", ".join(getattr(result, "not_provable", []) or ["a kernel option"])
    failed = [e for e in result.evidence if not e.ok]
    return "; ".join(f"{e.what}: expected {e.expected!r}, saw {e.observed!r}" for e in failed)[:400]


def run_mutations(
    file: str,
    mutations: Iterable[Mutation],
    *,
    fresh: Iterable[str] = (),
    control: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[MutationResult]:
    """Run every mutation of one lab file against one build of the lab; results in the given order.

    Checks run in the lab file's order (a check may rely on an earlier one,
    e.g. for ARP), each as baseline, its mutants, and (``control``) the
    original once more.  A check named in ``fresh`` changes state its own run
    depends on (a bridge that has not learnt yet): the lab is rebuilt before
    each of its runs.  Without the control a kill may be the mutant's stage
    left behind by an earlier run, not the mutation; the control costs one
    more run per check, so a suite with a time budget may run it only when
    the catalogue changes.
    """
    mutations = list(mutations)
    data = read_lab_data(file)
    data["name"] = unique_name(str(data.get("name") or Path(file).stem))
    lab = validate(data, file)
    try:
        load_lab(file)
    except KernelLacksError as exc:  # the topology cannot be built here: every check is skipped, as run does
        return [MutationResult(m, "skipped", f"this kernel lacks {', '.join(exc.lacking)}") for m in mutations]
    results: dict[int, MutationResult] = {}
    by_check: dict[str, list[int]] = {}
    for i, mutation in enumerate(mutations):
        by_check.setdefault(mutation.check, []).append(i)
    known = {c.name for c in lab.checks}
    for name in set(by_check) - known:
        for i in by_check.pop(name):
            results[i] = MutationResult(mutations[i], "stale", f"the lab has no check {name!r}")
    fresh = set(fresh)
    say = progress or (lambda _text: None)

    pristine = True  # no check has run on the lab since it was built

    def run(subject: LabFile, name: str, rebuild: bool) -> CheckResult:
        nonlocal pristine
        if rebuild and not pristine:
            build.down(lab.name)
            build.up(lab, file)
        pristine = False
        return run_check(subject, next(c for c in subject.checks if c.name == name))

    build.up(lab, file)
    try:
        for check in lab.checks:
            if check.name not in by_check:
                continue
            rebuild = check.name in fresh
            say(f"{check.name}: baseline")
            baseline = run(lab, check.name, rebuild)
            pending = by_check[check.name]
            if _skipped(baseline):
                for i in pending:
                    results[i] = MutationResult(mutations[i], "skipped", _summary(baseline))
                continue
            if not baseline.passed:
                for i in pending:
                    results[i] = MutationResult(mutations[i], "baseline-failed", _summary(baseline))
                continue
            for i in pending:
                mutation = mutations[i]
                start = time.monotonic()
                try:
                    mutant = validate(mutated_lab_data(data, mutation), file)
                except InvalidMutation as exc:
                    results[i] = MutationResult(mutation, "invalid", str(exc))
                    continue
                except MutationError as exc:
                    results[i] = MutationResult(mutation, "stale", str(exc))
                    continue
                say(f"{check.name}: {mutation.label()}")
                outcome = run(mutant, check.name, rebuild)
                verdict: Outcome = "survived" if outcome.passed else "killed"
                results[i] = MutationResult(
                    mutation,
                    "skipped" if _skipped(outcome) else verdict,
                    "" if outcome.passed else _summary(outcome),
                    time.monotonic() - start,
                )
            if not control:
                continue
            say(f"{check.name}: control")
            again = run(lab, check.name, rebuild)
            if not again.passed:
                for i in pending:
                    if results[i].outcome == "killed":
                        results[i] = MutationResult(
                            mutations[i],
                            "control-failed",
                            f"the original check failed after its mutants: {_summary(again)}",
                            results[i].seconds,
                        )
    finally:
        build.down(lab.name)
    return [results[i] for i in range(len(mutations))]


# -- a whole catalogue -------------------------------------------------------


@dataclass
class LabRun:
    """The mutations of one lab file, run: results in catalogue order, wall time, or why none ran."""

    file: str
    results: list[MutationResult]
    seconds: float
    error: str | None = None


def run_lab(file: str, group: LabMutations, control: bool = True) -> LabRun:
    """Run one lab file's mutations; any failure becomes ``error`` so other labs still run."""
    start = time.monotonic()
    try:
        results = run_mutations(file, group.mutations(), fresh=group.fresh, control=control)
    except Exception as exc:  # a lab that cannot load or build is a result, not a crash of the suite
        return LabRun(file, [], time.monotonic() - start, f"{type(exc).__name__}: {exc}")
    return LabRun(file, results, time.monotonic() - start)


def must_run_alone(file: str, group: LabMutations) -> bool:
    """Host-wide sysctls of a lab change every other lab's kernel too, so such a lab runs alone."""
    try:
        return group.alone or bool(read_lab_data(file).get("sysctls"))
    except (OSError, LabctlError):
        return group.alone


def run_catalogue(work: Sequence[tuple[str, LabMutations]], jobs: int = 1, control: bool = True) -> dict[str, LabRun]:
    """Run several lab files' mutations, ``jobs`` labs at a time, by file.

    Each lab runs in a worker process of its own: evidence is attributed to
    the tasks of the process that runs a check, and the unique lab name carries
    the worker's pid, so two labs at once cannot adopt each other's packets.
    Labs that must run alone (:func:`must_run_alone`) run while nothing else does.
    """
    if jobs <= 1:
        return {file: run_lab(file, group, control) for file, group in work}
    from concurrent.futures import ProcessPoolExecutor

    from labctl.verify.workers import stop_fork_server, worker_context

    alone = [(f, g) for f, g in work if must_run_alone(f, g)]
    together = [(f, g) for f, g in work if f not in {a for a, _ in alone}]
    runs: dict[str, LabRun] = {}
    drained = False
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=worker_context()) as pool:
            for file, group in alone:
                runs[file] = pool.submit(run_lab, file, group, control).result()
            futures = {file: pool.submit(run_lab, file, group, control) for file, group in together}
            for file, future in futures.items():
                runs[file] = future.result()
        drained = True
    finally:  # as parallel.run_labs: the server goes with the pool, on failure too
        stop_fork_server(drained)
    return {file: runs[file] for file, _ in work}
