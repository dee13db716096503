"""Run lab files: bring the lab up, run its checks one by one, bring it down.

A check ends in one of four states: ``pass`` (every row agreed), ``fail``
(a row disagreed), ``error`` (a step could not do what it said, or the check
could not run), ``skip`` (this kernel lacks an option the check requires:
the claims it covers are *not provable here*, never proven by a look-alike).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labctl.errors import KernelLacksError, LabctlError, LabStateError
from labctl.evidence.kept_trace import kept_traces
from labctl.evidence.model import Evidence
from labctl.expect.base import Row
from labctl.kernel import kconfig, modules, version
from labctl.lab import build, state
from labctl.topology.checks import Check, LabFile
from labctl.verify.explain import explain
from labctl.verify.judge import judge
from labctl.verify.pcaps import write_check_pcap
from labctl.verify.results import CheckResult, LabResult
from labctl.verify.scope import load_lab_file, selected
from labctl.verify.stage import observe
from labctl.verify.turns import Alone, Turns


def _skipped(check: Check, lacking: list[str], start: float) -> CheckResult:
    return CheckResult(
        check.name,
        check.covers,
        check.description,
        "skip",
        [Row("this kernel has what the check needs", check.requires, f"lacks {', '.join(lacking)}", True)],
        {},
        time.monotonic() - start,
        not_provable=lacking,
    )


def run_check(lab: LabFile, check: Check, pcap_dir: str | None = None, observations: bool = True) -> CheckResult:
    """Run one check of a lab that is up.  ``observations``: keep the Evidence as plain data in the result
    (``observation``, what ``--json``, ``--junit`` and a VM run report); without it the result has the
    verdict rows only -- rx-backlog's 20,000 traced packets were 0.2 s to turn into dicts, 7 MB to pickle
    and 0.4 s to unpickle in ``run -j``, for a report that prints none of it."""
    start = time.monotonic()
    outside = version.outside(check.kernel)
    if outside:
        return CheckResult(
            check.name,
            check.covers,
            check.description,
            "skip",
            [Row("the lab states this check for", check.kernel, version.release(), True)],
            {},
            time.monotonic() - start,
            not_provable=[outside],
        )
    lacking = kconfig.missing(check.requires)
    if lacking:
        return _skipped(check, lacking, start)
    rows: list[Row] = []
    observation: dict[str, Any] = {}
    explanation: list[str] = []
    error = None
    status = "pass"
    recorded: Evidence | None = None
    for _ in range(check.repeat):
        try:
            # modules behind the options it requires (a distribution kernel's `m`): released by down
            modules.acquire_for_options(build.owner(lab.name), kconfig.as_modules(check.requires))
            evidence, ctx = observe(lab, check)
            recorded = evidence
            rows = judge(check, evidence, ctx)
            observation = evidence.as_dict() if observations else {}
            if evidence.errors:
                error = "; ".join(evidence.errors)
                status = "error"
            elif not all(r.ok for r in rows):
                status = "fail"
                explanation = explain(evidence)
        except (LabctlError, OSError) as exc:
            error, status = str(exc), "error"
            rows = [Row("the check ran", "no error", error, False)]
        except Exception as exc:  # the report must say what broke, not hide it
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            status = "error"
            rows = [Row("the check ran", "no error", f"{type(exc).__name__}: {exc}", False)]
        if status != "pass":
            break
    written = None
    if pcap_dir and recorded is not None:
        frames = {key: list(capture.captured) for key, capture in recorded.captures.items()}
        written = write_check_pcap(pcap_dir, lab.name, check.name, status, rows, frames)
    return CheckResult(
        check.name,
        check.covers,
        check.description,
        status,
        rows,
        observation,
        time.monotonic() - start,
        error,
        explanation,
        recorded=recorded,
        pcap=written,
    )


def with_topology_requires(check: Check, lacking: list[str]) -> Check:
    """The check as run here: its requires include the options its lab's topology needs."""
    return check.model_copy(update={"requires": sorted(set(check.requires) | set(lacking))})


def run_lab(
    file: str,
    select: str | None = None,
    keep: bool = False,
    on_check: Callable[[str, str], None] | None = None,
    reuse: bool = False,
    pcap_dir: str | None = None,
    turns: Turns | None = None,
    loaded: LabFile | None = None,
    observations: bool = True,
) -> LabResult:
    """Bring the lab up, run its (selected) checks, bring it down unless ``keep``.

    A lab already up (``labctl up``) is never converged or torn down by a run:
    without ``reuse`` the run refuses; with it the checks run against the lab
    as it is and it stays up.  ``turns`` says when the lab may act beside
    other labs (``run -j``); by default it never waits.  ``loaded``: ``file`` as
    :func:`load_lab_file` returned it already (a ``-j`` worker loads it first to
    learn its turns; loading twice cost each lab ~10 ms of validation and a
    sysctl probe).  ``observations``: as :func:`run_check`.
    """
    turns = turns or Alone()
    start = time.monotonic()
    try:
        lab = loaded or load_lab_file(file)
    except KernelLacksError as exc:
        # the topology needs a kind this kernel lacks: nothing can be built, every check is not provable here
        from labctl.topology.loader import load_file

        lab = load_file(file, LabFile)[0]
        result = LabResult(lab=lab.name, file=file)
        for check in selected(lab, select):
            if on_check:
                on_check(lab.name, check.name)
            lacking = sorted(set(exc.lacking) | set(kconfig.missing(check.requires)))
            result.checks.append(_skipped(with_topology_requires(check, lacking), lacking, start))
        result.seconds = time.monotonic() - start
        return result
    result = LabResult(lab=lab.name, file=file)
    chosen = selected(lab, select)
    if not chosen:
        return result  # nothing to prove here: do not build the lab for nothing
    already_up = state.load(lab.name) is not None
    if already_up and not reuse:
        raise LabStateError(
            f"lab {lab.name} is up already (labctl up); a run would converge and remove it: "
            f"use --reuse to run the checks against it and leave it up, or labctl down {lab.name} first"
        )
    with turns.lab():
        if not already_up:
            with turns.phase():
                build.up(lab, file)
        try:
            with kept_traces():  # one tracefs instance for the lab's windows (labctl/evidence/kept_trace.py)
                for check in chosen:
                    if on_check:
                        on_check(lab.name, check.name)
                    with turns.phase(check):
                        result.checks.append(run_check(lab, check, pcap_dir, observations))
        finally:
            if not keep and not already_up:
                with turns.phase():
                    build.down(lab.name)
    result.seconds = time.monotonic() - start
    return result


def run_labs(
    files: list[str],
    select: str | None = None,
    keep: bool = False,
    on_check: Callable[[str, str], None] | None = None,
    reuse: bool = False,
    pcap_dir: str | None = None,
    observations: bool = True,
) -> tuple[list[LabResult], bool]:
    """Run every lab file; a lab that cannot run is a result with its error (one broken lab must not cost the
    report of the others).  Returns the results and whether any file was bad input (exit 2).
    ``observations``: as :func:`run_check`."""
    results: list[LabResult] = []
    bad_input = False
    for file in files:
        try:
            results.append(
                run_lab(
                    file,
                    select=select,
                    keep=keep,
                    on_check=on_check,
                    reuse=reuse,
                    pcap_dir=pcap_dir,
                    observations=observations,
                )
            )
        except LabctlError as exc:
            bad_input = bad_input or exc.exit_code == 2
            results.append(LabResult(lab=Path(file).stem, file=file, error=str(exc)))
    return results, bad_input
