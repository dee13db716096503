"""The mutation suite's one expensive step, shared: every selected lab is built once and its mutations run.

The first test that needs a verdict runs all the labs the session selected
(``-k rx-path`` builds only rx-path), ``LABCTL_MUTATION_JOBS`` at a time
(default 2, the CI machine's cores; labs marked ``alone`` or with host-wide
sysctls run while no other does); every later test only reads the result.
Control runs (the original check again after its mutants, to catch kills that
are really state left by an earlier run) cost a run per check: set
``LABCTL_MUTATION_CONTROL=1`` when the catalogue or a lab changes.
The terminal summary prints the wall time and every mutation that survived,
so the cost stays visible next to the two-minute budget.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from labctl.verify.mutate import LabRun, run_catalogue
from labctl.verify.mutation import Catalogue, LabMutations, load_catalogue

REPO = Path(__file__).resolve().parents[2]
LABS = REPO / "labs"
CATALOGUE_FILE = Path(__file__).with_name("catalogue.yaml")
BUDGET_SECONDS = 120.0


def catalogue() -> Catalogue:
    return load_catalogue(str(CATALOGUE_FILE))


def lab_files() -> list[str]:
    """File names of labs/*.yaml, the catalogue's keys."""
    return sorted(p.name for p in LABS.glob("*.yaml"))


class MutationRuns:
    """Runs the selected labs' mutations once, on first use."""

    def __init__(self, wanted: list[str], jobs: int, control: bool) -> None:
        self.wanted = wanted
        self.jobs = jobs
        self.control = control
        self.runs: dict[str, LabRun] | None = None
        self.seconds = 0.0

    def get(self, lab_file: str) -> LabRun:
        if self.runs is None:
            groups = catalogue().labs
            work: list[tuple[str, LabMutations]] = [
                (str(LABS / name), groups[name]) for name in self.wanted if name in groups
            ]
            start = time.monotonic()
            runs = run_catalogue(work, jobs=self.jobs, control=self.control)
            self.seconds = time.monotonic() - start
            self.runs = {Path(file).name: run for file, run in runs.items()}
        return self.runs[lab_file]


_RUNS: list[MutationRuns] = []


@pytest.fixture(scope="session")
def mutation_runs(request: pytest.FixtureRequest) -> MutationRuns:
    if os.geteuid() != 0:
        pytest.skip("mutations run the labs: root is needed to build namespaces")
    wanted: list[str] = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("lab_file") if callspec is not None else None
        if "mutation_runs" in getattr(item, "fixturenames", ()) and name and name not in wanted:
            wanted.append(name)
    jobs = int(os.environ.get("LABCTL_MUTATION_JOBS", "2"))
    control = os.environ.get("LABCTL_MUTATION_CONTROL", "0") == "1"
    runs = MutationRuns(wanted, jobs, control)
    _RUNS.append(runs)
    return runs


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for runs in _RUNS:
        if runs.runs is None:
            continue
        count = sum(len(r.results) for r in runs.runs.values())
        over = "  OVER the 2-minute budget" if runs.seconds > BUDGET_SECONDS else ""
        write = terminalreporter.write_line
        terminalreporter.section("mutation suite")
        control = "with" if runs.control else "without"
        write(
            f"{len(runs.runs)} labs, {count} mutations, {runs.seconds:.1f} s wall,"
            f" {runs.jobs} job(s), {control} control runs{over}"
        )
        for name, run in runs.runs.items():
            survived = [r for r in run.results if r.outcome == "survived"]
            skipped = [r for r in run.results if r.outcome == "skipped"]
            more = f", {len(skipped)} skipped (not provable on this kernel)" if skipped else ""
            write(f"  {name}: {run.seconds:.1f} s, {len(run.results)} mutations, {len(survived)} survived{more}")
            if run.error:
                write(f"    ERROR {run.error}")
            for r in survived:
                tag = "known" if r.mutation.known_survivor else "NEW"
                write(f"    [{tag}] {r.mutation.check}: {r.mutation.label()} -- {r.mutation.why}")
        slowest = sorted((r for run in runs.runs.values() for r in run.results), key=lambda r: -r.seconds)[:8]
        write("slowest mutations (where to cut when over budget):")
        for r in slowest:
            write(f"  {r.seconds:5.2f} s  {r.mutation.check}: {r.mutation.label()}")
