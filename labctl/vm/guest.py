"""Inside the guest: run the job's labs with the runner, write the results to the result disk.

Started by the job's script (:data:`labctl.vm.job.GUEST_SCRIPT`) as ``python -m labctl.vm.guest JOB DISK``.
Progress goes to the console as ``labctl-progress: LAB: CHECK`` lines, which the host only shows as progress;
the results go to the raw result disk (:mod:`labctl.vm.protocol`), whatever happens -- a crash of the run is
reported as the payload's ``error``, so the host never has to guess from the console.  The payload is written
again after every lab (``finished`` false, ``running`` the next lab): a lab that panics the guest's kernel costs
only its own result, and the host names it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from typing import Any

from labctl.vm import protocol


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def run_job(job: dict[str, Any], writer: protocol.ResultWriter) -> dict[str, Any]:
    """Run the job's labs one by one, writing the payload so far before each lab and after the last."""
    from labctl.verify.runner import run_labs

    boot = uptime()
    start = time.monotonic()
    payload: dict[str, Any] = {
        "kernel": {"release": platform.release(), "version": platform.version()},
        "boot_seconds": round(boot, 2),
        "labs": [],
        "bad_input": False,
        "error": None,
        "finished": False,
        "running": None,
    }

    def progress(lab: str, check: str) -> None:
        print(f"labctl-progress: {lab}: {check}", flush=True)

    try:
        for entry in job["files"]:
            payload["running"] = entry["host"]
            payload["run_seconds"] = round(time.monotonic() - start, 2)
            writer.write(payload)
            results, bad_input = run_labs([entry["guest"]], select=job.get("select"), on_check=progress)
            for result in results:
                result.file = entry["host"]
            payload["labs"] += [r.as_dict() for r in results]
            payload["bad_input"] = payload["bad_input"] or bad_input
    except BaseException as exc:  # the host must hear what broke, not a silent empty disk
        payload["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    payload["run_seconds"] = round(time.monotonic() - start, 2)
    payload["finished"], payload["running"] = True, None
    return payload


def exec_job(job: dict[str, Any]) -> dict[str, Any]:
    """``labctl vm exec``: one command, its exit status and output (bounded) in the payload."""
    import subprocess

    payload: dict[str, Any] = {"kernel": {"release": platform.release(), "version": platform.version()},
                               "boot_seconds": round(uptime(), 2), "labs": [], "error": None, "finished": True}
    start = time.monotonic()
    try:
        done = subprocess.run(job["command"], capture_output=True, timeout=job.get("timeout"))
        payload["exec"] = {"returncode": done.returncode, "stdout": done.stdout[-4_000_000:].decode(errors="replace"),
                           "stderr": done.stderr[-4_000_000:].decode(errors="replace")}
    except (OSError, subprocess.TimeoutExpired) as exc:
        payload["exec"] = {"returncode": 127, "stdout": "", "stderr": str(exc)}
    payload["run_seconds"] = round(time.monotonic() - start, 2)
    return payload


def main(argv: list[str]) -> int:
    job_file, disk = argv
    with open(job_file) as f:
        job = json.load(f)
    os.chdir(os.path.dirname(os.path.abspath(job_file)) + "/work")
    writer = protocol.ResultWriter(disk)
    payload = exec_job(job) if job.get("command") else run_job(job, writer)
    writer.write(payload)
    print(f"labctl-progress: done in {payload['run_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
