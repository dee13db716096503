"""A guest that stops before its run finishes: a lab that panics the guest's kernel, a kernel that does not boot.

What a user must get: the labs the guest finished, the lab it was running named with the kernel's crash line,
the labs it never started as not run -- never a pass -- and, over several kernels, the other kernels' runs.
The first tests need no VM; the ``vm`` ones boot Debian's 6.1 (``LABCTL_VM_TESTS=1``, from .ci/run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.vm import diff, kernels

ROOT = Path(__file__).resolve().parents[2]

QUICK_LAB = """\
name: {name}
topology:
  nodes:
    a: {{interfaces: {{eth0: {{addresses: [10.77.0.1/24]}}}}}}
    b: {{interfaces: {{eth0: {{addresses: [10.77.0.2/24]}}}}}}
  links:
    - endpoints: ["a:eth0", "b:eth0"]
checks:
  - name: {check}
    traffic:
      - {traffic}
    expect: {expect}
"""
PING = "ping: {node: a, to: 10.77.0.2}"
PANIC = "exec: {node: a, cmd: [sh, -c, 'echo c > /proc/sysrq-trigger']}"


def _lab(folder: Path, name: str, check: str, traffic: str, expect: str = "{reachable: true}") -> str:
    path = folder / f"{name}.yaml"
    path.write_text(QUICK_LAB.format(name=name, check=check, traffic=traffic, expect=expect))
    return str(path)


def test_the_lab_a_guest_died_in_is_named_and_the_rest_are_not_run(tmp_path: Path) -> None:
    files = [_lab(tmp_path, n, "c", PING) for n in ("first", "second", "third")]
    results = kernels.unfinished(files, {files[0]}, files[1], "the guest's kernel crashed: Kernel panic - x", "6.1.0")
    assert [(r.lab, r.error) for r in results] == [
        ("second", "the guest stopped during this lab: the guest's kernel crashed: Kernel panic - x"),
        ("third", "not run: the guest stopped during second.yaml"),
    ]
    assert not any(r.passed for r in results) and {r.kernel for r in results} == {"6.1.0"}


def test_a_kernel_that_gave_nothing_is_a_column_of_errors_in_the_table(tmp_path: Path) -> None:
    files = [_lab(tmp_path, "only", "reach", PING)]
    failed = kernels.failed_run(kernels.resolve("6.12"), files, "QEMU exited with 1: bad kernel\nmore")
    assert failed.stopped and [r.error for r in failed.results] == ["not run: QEMU exited with 1: bad kernel"]
    host = kernels.KernelRun(kernels.resolve("host"), "6.18", [])  # what the host's run of the lab looked like
    from labctl.verify.results import CheckResult, LabResult

    host.results = [LabResult("only", files[0], [CheckResult("reach", [], "", "pass", [], {}, 0.1)])]
    rows = diff.table([("host", host.results), ("6.12", failed.results)])
    kinds = {(row.lab, row.check): (row.kind, row.verdicts["6.12"].status) for row in rows}
    assert kinds == {("only", diff.LAB_ROW): ("differs", "error"), ("only", "reach"): ("differs", "absent")}


@pytest.mark.vm
def test_a_lab_that_panics_the_guest_costs_only_its_own_result(tmp_path: Path) -> None:
    """On 6.1: a lab that passes, one whose exec step crashes the kernel (sysrq c), one after it.  The first
    is reported as passed from the result the guest wrote before the crash; the second names the panic."""
    files = [_lab(tmp_path, "before-crash", "reach", PING), _lab(tmp_path, "crash", "panic", PANIC),
             _lab(tmp_path, "after-crash", "reach", PING)]
    done = subprocess.run([sys.executable, "-m", "labctl.cli", "run", "--kernel", "6.1", "--json", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    labs = {lab["lab"]: lab for lab in report["labs"]}
    assert labs["before-crash"]["passed"] and labs["before-crash"]["kernel"].startswith("6.1.")
    assert "the guest stopped during this lab" in labs["crash"]["error"]
    assert "Kernel panic" in labs["crash"]["error"] or "sysrq" in labs["crash"]["error"].lower()
    assert labs["after-crash"]["error"] == "not run: the guest stopped during crash.yaml"
    assert "Kernel panic" in report["kernels"][0]["stopped"] or "sysrq" in report["kernels"][0]["stopped"].lower()


@pytest.mark.vm
def test_a_kernel_that_does_not_boot_leaves_the_hosts_run_and_the_table(tmp_path: Path) -> None:
    """``--kernel host --kernel NOT-A-KERNEL``: QEMU refuses the file; the host's run and the table still come,
    the other kernel's column is errors, the exit status says not everything passed."""
    lab = _lab(tmp_path, "boots-not", "reach", PING)
    bogus = tmp_path / "bzImage"
    bogus.write_bytes(b"not a kernel\n" * 64)
    done = subprocess.run([sys.executable, "-m", "labctl.cli", "run", "--kernel", "host", "--kernel", str(bogus),
                           "--json", lab], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    host, other = report["kernels"]
    assert host["stopped"] is None and other["stopped"]
    assert report["claims"]["host"] is not None
    rows = {(row["lab"], row["check"]): row for row in report["diff"]}
    assert rows[("boots-not", "reach")]["verdicts"]["host"]["status"] == "pass"
    assert rows[("boots-not", "reach")]["kind"] == "differs"
    assert rows[("boots-not", diff.LAB_ROW)]["verdicts"][str(bogus)]["status"] == "error"
