"""Record golden files for the expectation kinds: real Evidence of a lab check, and its verdict.

Run as root to refresh (it builds the labs): ``.venv/bin/python tests/expect/record_golden.py``.
Each file holds the check as the lab states it, the Evidence its window returned, the
judge context, and the rows the judge gave; ``test_golden.py`` replays them without root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.verify.judge import judge
from labctl.verify.stage import observe

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = {
    "rx-path": ["delivered-to-socket", "waits-in-the-socket-queue", "closed-port", "receive-buffer-full"],
    "netfilter-hooks": ["order-forwarded", "drop-ends-the-packet"],
    "bridge-containers": ["flood-then-forward"],
    "tx-path": ["arp-unanswered", "output-drop-fails-the-send", "full-qdisc-drops"],
    "forwarding": ["prerouting-decides-the-route"],
    "ip6-router": ["ip6-hop-limit-exceeded", "ip6-closed-port"],
    "ip6-pmtu": ["pmtu-frag-needed", "pmtu-conntrack-entry-of-the-flow"],
    "ip6-udp-gso": ["gso-one-send-ten-datagrams"],
}


def record(lab_name: str, checks: list[str]) -> None:
    file = REPO / "labs" / f"{lab_name}.yaml"
    lab, _ = load_lab(str(file))
    lab = lab.model_copy(update={"name": f"g{lab_name.replace('-', '')[:10]}"})
    build.up(lab, str(file))
    try:
        for check in lab.checks:
            if check.name not in checks:
                continue
            evidence, ctx = observe(lab, check)
            rows = judge(check, evidence, ctx)
            data = {
                "lab": lab_name,
                "check": check.model_dump(mode="json", exclude_none=True),
                "context": {"traffic_protocols": sorted(ctx.traffic_protocols)},
                "evidence": evidence.as_dict(),
                "rows": [{"what": r.what, "ok": r.ok, "observed": r.observed} for r in rows],
            }
            out = GOLDEN / f"{lab_name}.{check.name}.json"
            out.write_text(json.dumps(data, indent=1, default=str, ensure_ascii=False) + "\n")
            print(f"{out.name}: {'PASS' if all(r.ok for r in rows) else 'FAIL'}", file=sys.stderr)
    finally:
        build.down(lab.name)


if __name__ == "__main__":
    chosen = sys.argv[1:]  # lab names: record only those (default: every case)
    for name, wanted in CASES.items():
        if not chosen or name in chosen:
            record(name, wanted)
