"""A snapshot of the root namespace, to prove a lab left the host as it was."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path


def host_snapshot() -> dict[str, str]:
    """Everything of the root namespace a lab must not change."""

    def run(*argv: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True)
        return result.stdout + result.stderr

    sysctls = [
        "net/core/netdev_max_backlog",
        "net/ipv4/ip_forward",
        "net/netfilter/nf_log_all_netns",
        "net/ipv6/conf/all/disable_ipv6",
    ]
    snapshot = {
        "links": run("ip", "-d", "-j", "link", "show"),
        "addresses": run("ip", "-j", "address", "show"),
        "routes": run("ip", "-j", "route", "show", "table", "all"),
        "rules": run("ip", "rule", "show"),
        "iptables-legacy": run("iptables-legacy-save"),
        "iptables-nft": run("iptables-nft-save"),
        "nft": run("nft", "list", "ruleset"),
        "other-netns": " ".join(n for n in os.listdir("/run/netns") if not n.startswith("labctl-"))
        if os.path.isdir("/run/netns")
        else "",
    }
    for key in sysctls:
        path = f"/proc/sys/{key}"
        snapshot[key] = Path(path).read_text() if os.path.exists(path) else "absent"
    for save in ("iptables-legacy", "iptables-nft"):
        # timestamps and packet counters of the host's own traffic are not changes
        snapshot[save] = re.sub(r"\[\d+:\d+\]", "[n:n]", re.sub(r"(?m)^#.*\n", "", snapshot[save]))
    for noisy in ("links", "addresses"):
        # counters and timers move on their own; compare structure, not statistics
        snapshot[noisy] = _strip_volatile(snapshot[noisy])
    return snapshot


def _strip_volatile(text: str) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text
    for item in data:
        for key in ("stats64", "stats", "operstate", "linkmode"):
            item.pop(key, None)
        for addr in item.get("addr_info", []):
            addr.pop("valid_life_time", None)
            addr.pop("preferred_life_time", None)
    return json.dumps(data, sort_keys=True)
