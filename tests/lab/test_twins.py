"""Attribution is exact to the lab: two identical copies side by side, plus noise, change no verdict.

The copies share every name (nodes, interfaces, bridge, addresses, MACs,
ports) and run their checks at the same time in two processes, while a third
copy floods the same kinds of events (closed-port drops, fdb learning,
unanswered ARP for the same address).  Each copy's checks must give the same
verdict every time: the true ones pass, the false one fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from labctl.kernel import netns

HERE = Path(__file__).resolve().parent
TWIN = HERE / "twin.yaml"
ITERATIONS = int(os.environ.get("LABCTL_TWIN_ITERATIONS", "20"))


def _python(script: str, *args: str) -> list[str]:
    return [sys.executable, str(HERE / script), *args]


def test_two_copies_and_noise_change_no_verdict() -> None:
    tag = f"w{os.getpid() % 100000}"
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    noise = subprocess.Popen(
        _python("twin_noise.py", str(TWIN), f"{tag}n", "300"), stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert noise.stdout is not None and noise.stdout.readline().strip() == "ready"
        workers = [
            subprocess.Popen(
                _python("twin_worker.py", str(TWIN), f"{tag}{copy}", str(ITERATIONS)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for copy in ("a", "b")
        ]
        results = []
        for worker in workers:
            out, err = worker.communicate(timeout=600)
            assert worker.returncode == 0, err[-3000:]
            results.append(json.loads(out.splitlines()[-1]))
    finally:
        noise.terminate()
        noise.wait(timeout=30)
    for result in results:
        assert result["failures"] == []
        for name, statuses in result["statuses"].items():
            assert len(statuses) == ITERATIONS
            assert set(statuses) == {"fail" if name == "wrong-on-purpose" else "pass"}
    for copy in ("a", "b", "n"):
        assert netns.list_labctl(f"{tag}{copy}") == []
