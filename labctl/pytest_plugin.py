"""pytest plugin: ``pytest labs/`` runs every check of every lab file as a test item.

A lab file is collected when it is YAML with a top-level ``checks:`` key; its
lab is brought up once before its first check and taken down after its last,
and a failing check shows its evidence rows (expected vs observed) and the
traced path, like ``labctl run``.

For tests written in Python, the ``lab`` fixture brings a lab file up once
per test module and yields a :class:`labctl.lab.handle.Lab` (exec, inject,
send, capture, counters, trace, check); the module names its file with
``pytestmark = pytest.mark.lab("labs/rx-path.yaml", name="my-rx")``.

Claims: every collected check carries ``claim(ID)`` markers for the claims
it covers, and a Python test can say ``@pytest.mark.claim("R7")``;
``--claim R7`` (repeatable) runs only the tests of those claims, and
``-m "claim(id='R7')"`` works too.

With pytest-xdist (``pytest -n 2 labs/``) the checks of one lab file stay in
one worker (``--dist load``, what ``-n`` implies, becomes ``loadfile``), and
a lab or check that needs the host to itself runs while no other lab of the
session acts (labctl/verify/parallel.py's lock, named after
the session).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labctl.errors import LabctlError
from labctl.topology.checks import Check, LabFile
from labctl.verify.turns import Alone, Turns


def _is_lab_file(path: Path) -> bool:
    if path.suffix not in (".yaml", ".yml"):
        return False
    try:
        return any(line.startswith("checks:") for line in path.read_text(encoding="utf-8").splitlines())
    except OSError:
        return False


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if _is_lab_file(file_path):
        return LabCollector.from_parent(parent, path=file_path)
    return None


class CheckFailed(Exception):
    """A check whose evidence did not match; carries the result for the report."""

    def __init__(self, result: Any) -> None:
        super().__init__(result.name)
        self.result = result


class LabCollector(pytest.File):
    lab: LabFile | None = None
    _held: contextlib.ExitStack | None = None
    lacking: list[str] | None = None
    """Kernel options the lab's topology needs and this kernel lacks: nothing is built, every check skips."""
    turns: Turns = Alone()
    """When the lab may act beside the other workers' labs (pytest -n: labctl/verify/parallel.py)."""

    def collect(self) -> Iterator[pytest.Item]:
        from labctl.errors import KernelLacksError
        from labctl.verify.scope import load_lab_file

        try:
            self.lab = load_lab_file(str(self.path))
        except KernelLacksError as exc:
            from labctl.topology.loader import load_file

            self.lab, self.lacking = load_file(str(self.path), LabFile)[0], list(exc.lacking)
        except LabctlError as exc:
            raise self.CollectError(str(exc)) from exc
        for check in self.lab.checks:
            item = CheckItem.from_parent(self, name=check.name, check=check)
            item.add_marker(pytest.mark.xdist_group(name=str(self.path)))  # one lab, one worker
            yield item

    def setup(self) -> None:
        from labctl.lab import build

        assert self.lab is not None
        if self.lacking:
            return
        run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # set in xdist workers only
        if run:
            from labctl.verify.parallel import RunLock

            self.turns = RunLock(f"pytest-{run}").turns(self.lab)
        self._held = contextlib.ExitStack()
        self._held.enter_context(self.turns.lab())
        with self.turns.phase():
            build.up(self.lab, str(self.path))

    def teardown(self) -> None:
        from labctl.lab import build

        try:
            if self.lab is not None and not self.lacking:
                with self.turns.phase():
                    build.down(self.lab.name)
        finally:
            if self._held is not None:
                self._held.close()
                self._held = None


class CheckItem(pytest.Item):
    def __init__(self, *, check: Check, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        for claim in check.covers:
            self.add_marker(pytest.mark.claim(claim, id=claim))

    def runtest(self) -> None:
        from labctl.verify.runner import run_check

        parent = self.parent
        assert isinstance(parent, LabCollector) and parent.lab is not None
        if parent.lacking:
            pytest.skip(f"not provable here: this kernel lacks {', '.join(parent.lacking)}")
        with parent.turns.phase(self.check):
            result = run_check(parent.lab, self.check)
        if result.status == "skip":
            pytest.skip(f"not provable here: this kernel lacks {', '.join(result.not_provable)}")
        if not result.passed:
            raise CheckFailed(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, CheckFailed):
            result = excinfo.value.result
            lines = [f"check {result.name}: {result.status} (covers {', '.join(result.covers) or 'nothing'})"]
            if result.error:
                lines.append(f"  error: {result.error}")
            for row in result.evidence:
                mark = "ok " if row.ok else "BAD"
                lines.append(f"  {mark} {row.what}: expected {row.expected!r}, observed {row.observed!r}")
                if not row.ok:
                    lines += [f"      {d}" for d in row.detail] + ([f"      hint: {row.hint}"] if row.hint else [])
            lines += [f"  {line}" for line in result.explanation]
            return "\n".join(lines)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.path.name}::{self.name} [{', '.join(self.check.covers)}]"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "claim(id): the PATHS.md claim a lab check or test proves")
    config.addinivalue_line("markers", "lab(file, name=None): the lab file the module's `lab` fixture brings up")
    if getattr(config.option, "dist", "no") == "load":  # pytest -n N: keep each lab's checks in one worker
        # loadfile, not loadgroup: with pytest 9.2 and xdist 3.8 workers never add the xdist_group suffix
        # (a plain test file with @pytest.mark.xdist_group spreads over the workers too), so loadgroup ran
        # one lab's checks in several workers at once -- one tore the lab down under the others
        config.option.dist = "loadfile"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's controller learns the session's run id (the lock's name) as it starts a worker."""
    node.config.stash[_RUN_ID] = node.workerinput.get("testrunuid")


_RUN_ID = pytest.StashKey[str]()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """xdist's controller removes the session's lock files once every worker is done."""
    uid = session.config.stash.get(_RUN_ID, None)
    if uid:
        with contextlib.suppress(Exception):
            from labctl.verify.parallel import RunLock

            RunLock(f"pytest-{uid}").remove()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--claim",
        action="append",
        default=[],
        metavar="ID",
        help="labctl: run only checks and tests marked with this claim (e.g. R7; repeatable)",
    )


def claims_of(item: pytest.Item) -> set[str]:
    """Claim ids of an item: ``claim("R7")``, ``claim(id="R7")`` or ``claim("R7", "R8")``."""
    found: set[str] = set()
    for mark in item.iter_markers("claim"):
        found.update(str(a) for a in mark.args)
        if "id" in mark.kwargs:
            found.add(str(mark.kwargs["id"]))
    return found


@pytest.hookimpl(tryfirst=True)  # before -m reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:  # a positional claim("R7") also answers -m "claim(id='R7')"
        for mark in list(item.iter_markers("claim")):
            if "id" not in mark.kwargs:
                for claim in mark.args:
                    item.add_marker(pytest.mark.claim(claim, id=claim))
    wanted = set(config.getoption("--claim") or [])
    if not wanted:
        return
    keep = [i for i in items if claims_of(i) & wanted]
    deselected = [i for i in items if not claims_of(i) & wanted]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The module's lab, up for the whole module and down after it.

    The file comes from ``pytest.mark.lab(FILE, name=NAME)`` on the module
    (``pytestmark``) or on the test, relative to the test file's folder or
    the working directory; ``name`` (optional) renames the lab so the test
    cannot collide with a lab someone else has up.
    """
    from labctl.lab.handle import Lab

    marker = request.node.get_closest_marker("lab")
    if marker is None or not marker.args:
        raise pytest.UsageError(
            f"{request.node.nodeid}: the lab fixture needs pytestmark = pytest.mark.lab('FILE.yaml')"
        )
    file = Path(str(marker.args[0]))
    if not file.is_absolute() and not file.exists():
        file = Path(str(request.node.path)).parent / file
    handle = Lab(str(file), name=marker.kwargs.get("name"))
    handle.up()
    try:
        yield handle
    finally:
        handle.down()
