"""The check × kernel verdict table and kernel ranges, without a VM."""

from __future__ import annotations

import pytest

from labctl.expect.base import Row
from labctl.kernel import version
from labctl.verify.results import CheckResult, LabResult
from labctl.vm import diff


def _check(name: str, status: str, lacks: list[str] | None = None) -> CheckResult:
    rows = [Row("x", 1, 1 if status == "pass" else 0, status in ("pass", "skip"))]
    return CheckResult(name, [], "", status, rows, {}, 0.1, "boom" if status == "error" else None,
                       not_provable=lacks or [])


def _lab(*checks: CheckResult, error: str | None = None, name: str = "lab") -> LabResult:
    return LabResult(name, f"labs/{name}.yaml", list(checks), 1.0, error)


def test_differences_first_then_explained_then_same() -> None:
    host = [_lab(_check("same", "pass"), _check("broute", "skip", ["CONFIG_BRIDGE_EBT_BROUTE"]),
                 _check("rcvbuf", "pass"))]
    guest = [_lab(_check("same", "pass"), _check("broute", "pass"), _check("rcvbuf", "fail"))]
    rows = diff.table([("host", host), ("6.1", guest)])
    assert [(r.check, r.kind) for r in rows] == [("rcvbuf", "differs"), ("broute", "explained"), ("same", "same")]
    assert rows[1].verdicts["host"].reason == "lacks CONFIG_BRIDGE_EBT_BROUTE"
    assert rows[0].verdicts["6.1"].reason == "x"
    assert diff.counts(rows) == {"differs": 1, "explained": 1, "same": 1}


def test_a_lab_that_cannot_load_on_one_kernel_is_a_difference() -> None:
    host = [_lab(_check("a", "pass"))]
    guest = [_lab(error="labs/lab.yaml:3: checks[0]: unknown drop reason\nmore")]
    rows = diff.table([("host", host), ("6.1", guest)])
    kinds = {(r.check, r.kind) for r in rows}
    assert kinds == {(diff.LAB_ROW, "differs"), ("a", "differs")}
    lab_row = next(r for r in rows if r.check == diff.LAB_ROW)
    assert lab_row.verdicts["host"].status == "absent" and "unknown drop reason" in lab_row.verdicts["6.1"].reason


def test_error_vs_fail_is_a_difference_too() -> None:
    rows = diff.table([("a", [_lab(_check("c", "fail"))]), ("b", [_lab(_check("c", "error"))])])
    assert rows[0].kind == "differs" and rows[0].verdicts["b"].reason == "boom"


@pytest.mark.parametrize(
    ("spec", "release", "holds"),
    [(">=6.2", "6.18.0", True), (">=6.2", "6.1.0-50-cloud-amd64", False), ("<6.2", "6.1.176", True),
     ("6.1", "6.1.0-50-cloud-amd64", True), ("==6.1", "6.18.1", False), (">=5.15,<6.8", "6.1.0", True),
     (">=5.15, <6.8", "6.8.0", False), ("!=6.1", "6.18", True)],
)
def test_kernel_ranges(spec: str, release: str, holds: bool) -> None:
    assert version.matches(spec, release) is holds


def test_outside_names_the_range_and_this_kernel() -> None:
    assert version.outside(None) is None
    assert version.outside(">=1.0") is None
    reason = version.outside("<1.0")
    assert reason is not None and reason.startswith("kernel <1.0 (this is ")
