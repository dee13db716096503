"""Ordered walks (netfilter hooks, trace stages): exact by default, "contains in order" when asked.

A walk expectation is a list, meaning *every* packet of the check walked
exactly this list, or a mapping with one form:

* ``{each: [...]}`` -- the same as the plain list;
* ``{contains: [...]}`` -- every packet's walk has these steps in this order (others may come between);
* ``{packets: [[...], [...]]}`` -- the walks of the packets in the order they appeared, each exact, and
  exactly that many packets.

A failing walk is shown whole, with the first differing step marked, never cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

from pydantic import Field, model_validator

from labctl.topology.model import Strict

Steps = Annotated[list[str], Field(min_length=1)]


class WalkMatch(Strict):
    each: Steps | None = None
    contains: Steps | None = None
    packets: Annotated[list[Steps], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one(self) -> WalkMatch:
        given = [k for k in ("each", "contains", "packets") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a walk has exactly one of 'each', 'contains' or 'packets'")
        return self


WalkForm = Steps | WalkMatch

StepMatch = Callable[[str, str], bool]


def walk_counts(walks: Sequence[Sequence[str]], show: Callable[[str], str] | None = None) -> dict[str, int]:
    """Distinct walks with how many packets took each: a compact 'observed' for a report line."""
    counts: dict[str, int] = {}
    for walk in walks:
        text = " → ".join(show(s) if show else s for s in walk) or "(nothing)"
        counts[text] = counts.get(text, 0) + 1
    return counts
"""(expected step, observed step) -> whether they name the same thing."""


def _equal(a: str, b: str) -> bool:
    return a == b


def form_steps(form: WalkForm) -> list[str]:
    """Every step name the form mentions (to validate them, and to project traces onto them)."""
    if isinstance(form, list):
        return list(form)
    if form.packets is not None:
        return [s for walk in form.packets for s in walk]
    return list(form.each or form.contains or [])


def _in_order(wanted: Sequence[str], seen: Sequence[str], same: StepMatch) -> bool:
    it = iter(seen)
    return all(any(same(w, s) for s in it) for w in wanted)


def _exact(wanted: Sequence[str], seen: Sequence[str], same: StepMatch) -> bool:
    return len(wanted) == len(seen) and all(same(w, s) for w, s in zip(wanted, seen, strict=True))


def _plain(step: str) -> str:
    return step


def diff_lines(
    wanted: Sequence[str], seen: Sequence[str], same: StepMatch = _equal, show: Callable[[str], str] = _plain
) -> list[str]:
    """Expected and observed side by side; the first differing step is marked with ``✗``."""
    lines = []
    first_bad = next(
        (
            i
            for i in range(max(len(wanted), len(seen)))
            if i >= len(wanted) or i >= len(seen) or not same(wanted[i], seen[i])
        ),
        None,
    )
    for i in range(max(len(wanted), len(seen))):
        w = wanted[i] if i < len(wanted) else "—"
        s = seen[i] if i < len(seen) else "—"
        mark = "✗" if i == first_bad else ("=" if i < len(wanted) and i < len(seen) and same(w, s) else " ")
        s = show(s) if i < len(seen) else s
        lines.append(f"{mark} {i + 1:>2}. expected {w:<34} observed {s}")
    return lines


def judge_walks(
    form: WalkForm,
    walks: Sequence[Sequence[str]],
    same: StepMatch = _equal,
    show: Callable[[str], str] = _plain,
) -> tuple[bool, list[str]]:
    """Whether the packets' walks satisfy the form, and the lines that show why not."""
    if not walks:
        return False, ["no packet of the check was traced here"]
    if isinstance(form, list) or form.each is not None:
        wanted = form if isinstance(form, list) else (form.each or [])
        bad = [(i, w) for i, w in enumerate(walks) if not _exact(wanted, w, same)]
        if not bad:
            return True, []
        i, walk = bad[0]
        return False, [
            f"packet {i + 1} of {len(walks)} (each must walk exactly the list):",
            *diff_lines(wanted, walk, same, show),
        ]
    if form.contains is not None:
        bad = [(i, w) for i, w in enumerate(walks) if not _in_order(form.contains, w, same)]
        if not bad:
            return True, []
        i, walk = bad[0]
        return False, [
            f"packet {i + 1} of {len(walks)} lacks, in this order, {' → '.join(form.contains)}:",
            f"  observed {' → '.join(show(s) for s in walk) or '(nothing)'}",
        ]
    packets = form.packets or []
    if len(packets) != len(walks):
        return False, [
            f"expected {len(packets)} packets, observed {len(walks)}:",
            *(f"  packet {i + 1}: {' → '.join(show(s) for s in w)}" for i, w in enumerate(walks)),
        ]
    for i, (wanted, walk) in enumerate(zip(packets, walks, strict=True)):
        if not _exact(wanted, walk, same):
            return False, [f"packet {i + 1} of {len(walks)}:", *diff_lines(wanted, walk, same, show)]
    return True, []
