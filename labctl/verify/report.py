"""Reports of verification runs: Rich for people, JSON and JUnit XML for CI.

Values are never cut: a failing walk is printed whole, with its first
differing step marked, because the step that differs is the one a reader
needs.  Claims are reported honestly: proven only when every check covering
them passed on this kernel; not provable here when this kernel lacks what
their checks require.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from labctl.verify.results import CheckResult, LabResult

MARKS = {"pass": "[green]PASS[/]", "fail": "[red]FAIL[/]", "error": "[red]ERROR[/]", "skip": "[yellow]SKIP[/]"}


def _text(value: Any) -> str:
    """Observed values go into Rich markup lines: ``[true]`` must print, not vanish as a tag."""
    return escape(value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False))


@dataclass
class ClaimReport:
    proven: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_provable: dict[str, list[str]] = field(default_factory=dict)


def claims(results: list[LabResult]) -> ClaimReport:
    """Each claim's verdict from every check that covers it."""
    statuses: dict[str, list[CheckResult]] = {}
    for lab in results:
        for check in lab.checks:
            for claim in check.covers:
                statuses.setdefault(claim, []).append(check)
    report = ClaimReport()
    for claim, covering in sorted(statuses.items()):
        # a check the lab states for other kernels (kernel: range) does not apply here: it neither proves
        # nor withholds the claim, unless no check covering it applies to this kernel
        applicable = [c for c in covering if not (c.status == "skip" and _only_kernel_range(c))]
        checks = applicable or covering
        if any(c.status in ("fail", "error") for c in checks):
            report.failed.append(claim)
        elif any(c.status == "skip" for c in checks):
            report.not_provable[claim] = sorted({o for c in checks for o in c.not_provable})
        else:
            report.proven.append(claim)
    return report


def _only_kernel_range(check: CheckResult) -> bool:
    return bool(check.not_provable) and all(reason.startswith("kernel ") for reason in check.not_provable)


def print_check(console: Console, check: CheckResult) -> None:
    covers = f" [{', '.join(check.covers)}]" if check.covers else ""
    console.print(f"  {MARKS[check.status]} {escape(check.name)}{escape(covers)}", highlight=False)
    for row in check.evidence:
        sign = "[green]✓[/]" if row.ok else "[red]✗[/]"
        line = f"      {sign} {escape(row.what)}: observed {_text(row.observed)}"
        if not row.ok:
            line += f"  [yellow](expected {_text(row.expected)})[/]"
        console.print(line, highlight=False, soft_wrap=True)
        if not row.ok:
            for detail in row.detail:
                console.print(f"          {escape(detail)}", highlight=False, soft_wrap=True)
            if row.hint:
                console.print(f"          [cyan]hint:[/] {escape(row.hint)}", highlight=False, soft_wrap=True)
    if check.status == "error" and check.error:
        console.print(f"      [red]{escape(check.error.splitlines()[0])}[/]", highlight=False, soft_wrap=True)
    for line in check.explanation:
        console.print(f"      [dim]{escape(line)}[/]", highlight=False, soft_wrap=True)


def print_results(console: Console, results: list[LabResult]) -> None:
    for lab in results:
        mark = "[green]PASS[/]" if lab.passed else "[red]FAIL[/]"
        console.print(f"{mark} [bold]{escape(lab.lab)}[/] ({escape(lab.file)}, {lab.seconds:.1f}s)", soft_wrap=True)
        if lab.error:
            console.print(f"    [red]{escape(lab.error)}[/]", highlight=False, soft_wrap=True)
        for check in lab.checks:
            print_check(console, check)
    checks = [c for lab in results for c in lab.checks]
    counted = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "error", "skip")}
    bad = counted["fail"] + counted["error"] + sum(1 for lab in results if lab.error)
    colour = "green" if not bad else "red"
    verdicts = claims(results)
    broken = sum(1 for lab in results if lab.error)
    summary = (
        f"[{colour}]{counted['pass']} passed, {counted['fail'] + counted['error']} failed"
        + (f", {broken} {'lab' if broken == 1 else 'labs'} in error[/]" if broken else "[/]")
        + f" ({counted['skip']} skipped, {len(results)} labs)"
    )
    console.print(summary)
    console.print(f"claims proven on this kernel: {', '.join(verdicts.proven) or 'none'}")
    for claim, options in verdicts.not_provable.items():
        console.print(f"[yellow]not provable here[/]: {claim} (this kernel lacks {', '.join(options)})")
    if verdicts.failed:
        console.print(f"[red]claims not proven[/]: {', '.join(verdicts.failed)}")


def as_json(results: list[LabResult]) -> str:
    verdicts = claims(results)
    return json.dumps(
        {
            "labs": [r.as_dict() for r in results],
            "claims": {"proven": verdicts.proven, "failed": verdicts.failed, "not_provable": verdicts.not_provable},
        },
        indent=2,
        default=str,
    )


def as_junit(results: list[LabResult], by_kernel: bool = False) -> str:
    """JUnit XML; ``by_kernel`` (results of several kernels) names each suite ``lab [kernel]``."""
    suites = ET.Element("testsuites")
    for lab in results:
        failures = sum(c.status == "fail" for c in lab.checks)
        errors = sum(c.status == "error" for c in lab.checks) + (1 if lab.error else 0)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"{lab.lab} [{lab.kernel}]" if by_kernel else lab.lab,
            tests=str(len(lab.checks)),
            failures=str(failures),
            errors=str(errors),
            skipped=str(sum(c.status == "skip" for c in lab.checks)),
            time=f"{lab.seconds:.3f}",
        )
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="kernel", value=lab.kernel)
        if lab.error:
            ET.SubElement(ET.SubElement(suite, "testcase", name="lab", classname=lab.lab), "error", message=lab.error)
        for check in lab.checks:
            case = ET.SubElement(suite, "testcase", name=check.name, classname=lab.lab, time=f"{check.seconds:.3f}")
            bad = [r for r in check.evidence if not r.ok]
            message = "; ".join(f"{r.what}: expected {_text(r.expected)}, observed {_text(r.observed)}" for r in bad)
            if check.status == "fail":
                ET.SubElement(case, "failure", message=message).text = json.dumps(
                    check.as_dict(), indent=2, default=str
                )
            elif check.status == "error":
                ET.SubElement(case, "error", message=check.error or message).text = json.dumps(
                    check.as_dict(), indent=2, default=str
                )
            elif check.status == "skip":
                ET.SubElement(case, "skipped", message=f"not provable here: lacks {', '.join(check.not_provable)}")
            ET.SubElement(case, "system-out").text = json.dumps([e.as_dict() for e in check.evidence], default=str)
    return ET.tostring(suites, encoding="unicode")
