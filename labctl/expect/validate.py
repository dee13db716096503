"""Load-time validation of every check's expectations against this kernel's facts (no lab is built)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from labctl.errors import KeyPath
from labctl.expect.base import KIND_MODULES, MachineFacts, kind


def machine_issues(
    checks: Sequence[Any], interfaces: Mapping[str, frozenset[str]], facts: MachineFacts
) -> list[tuple[KeyPath, str]]:
    """(key path, message) for every expectation this kernel cannot judge: names it does not have."""
    issues: list[tuple[KeyPath, str]] = []
    for i, check in enumerate(checks):
        for key in KIND_MODULES:  # only the kinds a check uses are imported
            value = getattr(check.expect, key)
            if value is None:
                continue
            for sub, message in kind(key).machine(value, facts):
                issues.append((("checks", i, "expect", key, *sub), message))
        if check.expect.counters:
            from labctl.expect.kinds.counters import counter_issue
        for node, wanted in (check.expect.counters or {}).items():
            for name in wanted:
                problem = counter_issue(interfaces.get(node, frozenset()), name, facts)
                if problem:
                    issues.append((("checks", i, "expect", "counters", node, name), problem))
    return issues
