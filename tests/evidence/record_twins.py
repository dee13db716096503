"""Record the golden file of ``test_twin_fdb.py``: two copies of the twin lab learning at the same moment.

Run as root to refresh (it builds two copies of ``tests/lab/twin.yaml``):
``.venv/bin/python tests/evidence/record_twins.py``.  Two processes run the
``learning`` check together, their injections released by one barrier, so each
copy's bridge learns the same MACs on the same port names within microseconds
of the other's.  Each window's raw trace (both copies' events: tracepoints are
global) and its scope are kept for the round where the look-alikes fell
closest together; the test replays them without root.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from labctl.evidence import window as window_module
from labctl.evidence.attribution import FDB_UPDATE, Scope
from labctl.kernel.tracefs import TraceEvent
from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.verify import stage

HERE = Path(__file__).resolve().parent
TWIN = HERE.parent / "lab" / "twin.yaml"
GOLDEN = HERE / "golden" / "twins-learning.json"
ROUNDS = 12
KEYS = ("net:", "skb:", "bridge:", "neigh:")


def event_dict(event: TraceEvent) -> dict[str, Any]:
    """What TraceEvent(**data) takes back (its key, devices ... are worked out again from these)."""
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event) if f.init}


def scope_dict(scope: Scope) -> dict[str, Any]:
    data = dataclasses.asdict(scope)
    data["devices"], data["tasks"], data["relays"] = sorted(scope.devices), sorted(scope.tasks), sorted(scope.relays)
    return data


def _copy(name: str, barrier: Any, out: str) -> None:
    lab, _ = load_lab(str(TWIN))
    lab = lab.model_copy(update={"name": name})
    check = next(c for c in lab.checks if c.name == "learning")
    real_inject, real_attribute = stage.inject, window_module.attribute
    rounds: list[dict[str, Any]] = []

    def inject(*args: Any, **kwargs: Any) -> int:
        barrier.wait(timeout=120)  # both copies send the same frame at the same moment
        return real_inject(*args, **kwargs)

    def attribute(events: Any, scope: Scope) -> Any:
        lo = scope.since - 0.3
        kept = [event_dict(e) for e in events if e.timestamp >= lo and e.key.startswith(KEYS)]
        rounds.append({"scope": scope_dict(scope), "events": kept})
        return real_attribute(events, scope)

    stage.inject = inject  # type: ignore[assignment]
    window_module.attribute = attribute  # type: ignore[assignment]
    build.up(lab, str(TWIN))
    try:
        for _ in range(ROUNDS):
            stage.observe(lab, check)
    finally:
        build.down(name)
    Path(out).write_text(json.dumps(rounds))


def _gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """How close copy a's fdb updates came to copy b's look-alikes (seconds, worst pair)."""
    def own(rec: dict[str, Any]) -> list[dict[str, Any]]:
        tasks = set(rec["scope"]["tasks"])
        return [e for e in rec["events"] if f"{e['system']}:{e['name']}" == FDB_UPDATE and e["pid"] in tasks]
    pairs = [(x, y) for x in own(a) for y in own(b) if (x["fields"]["dev"], x["fields"]["addr"]) ==
             (y["fields"]["dev"], y["fields"]["addr"])]
    if len(pairs) != 2:
        return float("inf")
    return max(abs(x["timestamp"] - y["timestamp"]) for x, y in pairs)


def main() -> None:
    tag = f"rt{os.getpid() % 10000}"
    barrier = multiprocessing.Barrier(2)
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"{copy}.json") for copy in ("a", "b")]
        procs = [
            multiprocessing.Process(target=_copy, args=(f"{tag}{copy}", barrier, out))
            for copy, out in zip(("a", "b"), outs, strict=True)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                sys.exit(f"a copy failed (exit {proc.exitcode})")
        a_rounds, b_rounds = (json.loads(Path(out).read_text()) for out in outs)
    best = min(zip(a_rounds, b_rounds, strict=True), key=lambda pair: _gap(*pair))
    print(f"closest look-alikes: {_gap(*best) * 1e6:.0f} µs apart", file=sys.stderr)
    GOLDEN.write_text(json.dumps({"a": best[0], "b": best[1]}, indent=None, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
