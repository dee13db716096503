"""Judges replayed on recorded Evidence (no root, no kernel): evidence in, verdict and text out.

The golden files are real windows of lab checks (``record_golden.py``).  Each
must give back exactly the rows it gave when recorded, and every mutation of
its expectations that states something false about that same evidence must
turn it red -- the judges' half of "every check has a mutation that kills it".
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from labctl.evidence.model import Evidence
from labctl.expect.base import JudgeContext
from labctl.topology.checks import Check
from labctl.verify.judge import judge

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.json"))


def _load(path: Path) -> tuple[Check, Evidence, JudgeContext, list[dict[str, Any]]]:
    data = json.loads(path.read_text())
    check = Check.model_validate(data["check"])
    ctx = JudgeContext(traffic_protocols=frozenset(data["context"]["traffic_protocols"]))
    return check, Evidence.from_dict(data["evidence"]), ctx, data["rows"]


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_recorded_evidence_gives_the_recorded_verdict(path: Path) -> None:
    check, evidence, ctx, recorded = _load(path)
    rows = judge(check, evidence, ctx)
    assert [{"what": r.what, "ok": r.ok, "observed": _normal(r.observed)} for r in rows] == recorded
    assert all(r["ok"] for r in recorded)


def _exact_counts(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every exact integer count in an expect mapping (bools are not counts)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _exact_counts(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _exact_counts(value, (*path, i))
    elif isinstance(node, int) and not isinstance(node, bool):
        found.append(path)
    return found


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def _mutations(check: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every exact count + 1; every walk reversed and cut short; every drop reason and place changed."""
    expect = check["expect"]
    out = []
    for path in _exact_counts(expect):
        if path[0] in ("sums",) and path[-1] != "equal":
            continue
        mutated = copy.deepcopy(check)
        _set(mutated["expect"], path, _get(expect, path) + 1)
        out.append((f"{'.'.join(map(str, path))} + 1", mutated))
    for key in ("stages", "hooks"):
        walks = [((key,), expect[key])] if key == "stages" and key in expect else []
        walks += [((key, node), w) for node, w in expect.get(key, {}).items()] if key == "hooks" else []
        for path, walk in walks:
            if isinstance(walk, list) and len(walk) > 1:
                # stages are projected onto the tracepoints they name: dropping a step drops its kind, a
                # weaker statement that stays true; a step said twice is false (each kind counts exactly)
                third = ("shortened", walk[:-1]) if key == "hooks" else ("a step repeated", [*walk, walk[0]])
                for label, changed in (("reversed", list(reversed(walk))), third):
                    mutated = copy.deepcopy(check)
                    _set(mutated["expect"], path, changed)
                    out.append((f"{'.'.join(path)} {label}", mutated))
    if "dropped" in expect:
        for field, value in (("reason", "SOCKET_FILTER"), ("at", "ip_rcv_finish")):
            mutated = copy.deepcopy(check)
            mutated["expect"]["dropped"][field] = value
            out.append((f"dropped.{field} = {value}", mutated))
    return out


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_every_false_statement_about_the_evidence_fails(path: Path) -> None:
    data = json.loads(path.read_text())
    _, evidence, ctx, _ = _load(path)
    mutations = _mutations(data["check"])
    assert mutations, "a golden check with nothing to mutate proves nothing"
    survivors = []
    for label, mutated in mutations:
        rows = judge(Check.model_validate(mutated), evidence, ctx)
        if all(r.ok for r in rows):
            survivors.append(label)
    assert survivors == []


def test_a_failing_walk_is_shown_whole_with_the_first_difference_marked() -> None:
    path = next(p for p in GOLDEN if p.stem == "netfilter-hooks.order-forwarded")
    data = json.loads(path.read_text())
    _, evidence, ctx, _ = _load(path)
    data["check"]["expect"]["hooks"]["router"] = list(reversed(data["check"]["expect"]["hooks"]["router"]))
    (bad,) = [r for r in judge(Check.model_validate(data["check"]), evidence, ctx) if not r.ok]
    marked = [line for line in bad.detail if line.startswith("✗")]
    assert len(marked) == 1 and "expected ip:nat:POSTROUTING" in marked[0] and "observed ip:raw:PREROUTING" in marked[0]
    assert len([line for line in bad.detail if "expected" in line]) == 8  # all 8 steps, never cut
