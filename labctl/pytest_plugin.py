"""pytest plugin: ``pytest labs/`` runs every check of every lab file as a test item.

A lab file is collected when it is YAML with a top-level ``checks:`` key; its
lab is brought up once before its first check and taken down after its last,
and a failing check shows its evidence rows (expected vs observed) and the
traced path, like ``labctl run``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labctl.errors import LabctlError
from labctl.topology.checks import Check, LabFile


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

    def collect(self) -> Iterator[pytest.Item]:
        from labctl.verify.runner import load_lab_file

        try:
            self.lab = load_lab_file(str(self.path))
        except LabctlError as exc:
            raise self.CollectError(str(exc)) from exc
        for check in self.lab.checks:
            yield CheckItem.from_parent(self, name=check.name, check=check)

    def setup(self) -> None:
        from labctl.lab import build

        assert self.lab is not None
        build.up(self.lab, str(self.path))

    def teardown(self) -> None:
        from labctl.lab import build

        if self.lab is not None:
            build.down(self.lab.name)


class CheckItem(pytest.Item):
    def __init__(self, *, check: Check, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        for claim in check.covers:
            self.add_marker(pytest.mark.claim(claim))

    def runtest(self) -> None:
        from labctl.verify.runner import run_check

        parent = self.parent
        assert isinstance(parent, LabCollector) and parent.lab is not None
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "claim(id): the PATHS.md claim a lab check proves")
