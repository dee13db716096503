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
    "tcp-connect": ["refused-by-rst", "stray-ack-is-reset", "accepted-with-transfer", "handshake-waits-in-accept-queue",
                    "accept-queue-overflows", "syn-dropped-in-output"],
    "tcpbr-exec-bridge": ["isolated-ports-do-not-talk"],
    "ip6-router": ["ip6-hop-limit-exceeded", "ip6-closed-port"],
    "ip6-pmtu": ["pmtu-frag-needed", "pmtu-conntrack-entry-of-the-flow"],
    "ip6-udp-gso": ["gso-one-send-ten-datagrams"],
    "ip6t-filter": ["ip6t-input-drop", "ip6t-forwarded", "ip6t-forward-drop", "ip6t-echo-dropped", "ip6t-masquerade"],
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
            dumped = check.model_dump(mode="json", exclude_none=True)
            # exec outcomes are stated once: a traffic step's as the exec expectation the model made of them,
            # a setup step's on the step (it is also the stage's own rule: an ERROR when unmet)
            for step in dumped.get("traffic", []):
                for key in ("exit", "stdout", "stderr"):
                    step.get("exec", {}).pop(key, None)
            derived = dumped.get("expect", {}).get("exec", {})
            for label in [label for label in derived if label.startswith("setup.")]:
                del derived[label]
            if "exec" in dumped.get("expect", {}) and not derived:
                del dumped["expect"]["exec"]
            data = {
                "lab": lab_name,
                "check": dumped,
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
