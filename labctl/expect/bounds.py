"""Counts an expectation states: an exact integer, or a bound for what is statistical.

Exact is the rule (``1``); bounds (``">=1"``, ``"<=5"``, ``"10..200"``) are
for what the kernel does not do the same way twice (backlog overflow).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StrictInt

_BOUND_RE = re.compile(r"^\s*(?:(>=|<=|>|<|==)\s*(\d+)|(\d+)\s*\.\.\s*(\d+))\s*$")


def parse_bound(value: int | str) -> tuple[int, int | None]:
    """A count expectation as an inclusive range (high None = no upper bound)."""
    if isinstance(value, bool):
        raise ValueError("a count is a number or a bound such as '>=1', not true/false")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a count cannot be negative")
        return value, value
    match = _BOUND_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a count: use 3, '>=1', '<=5', '>2' or '10..200'")
    op, num, low, high = match.groups()
    if low is not None:
        if int(low) > int(high):
            raise ValueError(f"{value!r}: the low end is above the high end")
        return int(low), int(high)
    n = int(num)
    if op == "<" and n == 0:
        raise ValueError(f"{value!r}: no count is below 0")
    return {
        ">=": (n, None),
        ">": (n + 1, None),
        "<=": (0, n),
        "<": (0, n - 1),
        "==": (n, n),
    }[op]


def _count(value: int | str) -> int | str:
    parse_bound(value)
    return value


Count = Annotated[StrictInt | str, AfterValidator(_count)]
"""StrictInt: ``true`` is not a count (pydantic would make it 1)."""


def matches(bound: int | str, observed: int) -> bool:
    low, high = parse_bound(bound)
    return observed >= low and (high is None or observed <= high)


def has_upper_bound(bound: int | str) -> bool:
    """Lost trace events can only lower a count: a lower bound survives them, nothing else does."""
    return parse_bound(bound)[1] is not None
