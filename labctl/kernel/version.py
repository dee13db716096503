"""Kernel versions: this kernel's release, and whether it is in a range a lab states (``kernel: ">=6.2"``).

A lab states per-kernel facts with a range on a check: on a kernel outside it the check is not run and the
difference is reported as explained by the lab (see labctl.vm.diff), never as a failure.
"""

from __future__ import annotations

import operator
import platform
import re

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
        "<": operator.lt}
_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*(\d+(?:\.\d+){0,2})\s*$")


def release() -> str:
    return platform.release()


def numbers(text: str) -> tuple[int, ...]:
    """``6.1.0-28-cloud-amd64`` -> (6, 1, 0); ``6.18`` -> (6, 18)."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(n) for n in match.group(0).split(".")) if match else ()


def matches(spec: str, kernel_release: str | None = None) -> bool:
    """Whether the kernel (this one by default) is in every comparison of ``spec``.

    Versions compare on as many parts as the spec names: ``==6.1`` holds for 6.1.0-28, ``>=6.2`` fails for
    6.1.158, ``<6.2`` holds for it.
    """
    have = numbers(kernel_release or release())
    for clause in spec.split(","):
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"not a kernel version range: {spec!r}")
        op, wanted = match.group(1) or "==", numbers(match.group(2))
        if not _OPS[op](have[: len(wanted)], wanted):
            return False
    return True


def outside(spec: str | None) -> str | None:
    """Why a check stated for ``spec`` does not apply to this kernel (shown as what it lacks), or None."""
    if spec is None or matches(spec):
        return None
    return f"kernel {spec.replace(' ', '')} (this is {release()})"
