"""The real thing: Debian 12's 6.1 booted in QEMU (TCG here) runs a lab and reports it back.

E3 is the lab run: the host kernel cannot show broute at all, 6.1 proves it with legacy ebtables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.vm import image, kernels
from labctl.vm.errors import VmError

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def test_e3_broute_is_proven_on_6_1() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "labctl.cli", "run", "--kernel", "6.1", "--json", "-k", "broute-routes",
         "labs/ebtables.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    (lab,) = report["labs"]
    (check,) = lab["checks"]
    assert lab["kernel"].startswith("6.1.") and check["kernel"] == lab["kernel"]
    assert check["status"] == "pass", check["evidence"]
    rows = {row["what"]: row["observed"] for row in check["evidence"]}
    assert rows["sw ebtables broute:BROUTING:1 packets (delta)"] == 1
    assert rows["sw ebtables filter:FORWARD:1 packets (delta)"] == 0
    assert report["claims"]["proven"] == ["E3"]
    assert report["kernels"][0]["accel"] in ("kvm", "tcg") and report["kernels"][0]["boot_seconds"] > 0


def test_a_guest_that_does_not_finish_is_killed() -> None:
    with pytest.raises(VmError, match="did not finish within 3 s"):
        kernels.boot(kernels.resolve("6.1"), [], None, "run", print, timeout=3)
    assert image.load() is not None


def test_6_12_boots_the_backports_kernel_and_meets_the_6_10_boundary() -> None:
    """``--kernel 6.12``: the same image, bookworm-backports' kernel; between 6.10 and the host's, the stray ACK
    to a listener is dropped with TCP_FLAGS (the ``>=6.10`` check passes, the ``<6.10`` one is skipped)."""
    done = subprocess.run(
        [sys.executable, "-m", "labctl.cli", "run", "--kernel", "6.12", "--json", "-k", "stray-ack",
         "labs/tcp-connect.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    (lab,) = report["labs"]
    assert lab["kernel"].startswith("6.12.")
    status = {check["name"]: check["status"] for check in lab["checks"]}
    assert status == {"stray-ack-is-reset": "pass", "stray-ack-is-reset-before-6-10": "skip"}
    assert report["kernels"][0]["kernel"] == "6.12"
