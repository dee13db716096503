"""Reports of verification runs: Rich for people, JSON and JUnit XML for CI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from rich.console import Console
from rich.markup import escape

from labctl.verify.runner import LabResult


def _short(value: Any, limit: int = 160) -> str:
    """Observed values go into Rich markup lines: ``[true]`` must print, not vanish as a tag."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


def print_results(console: Console, results: list[LabResult]) -> None:
    for lab in results:
        mark = "[green]PASS[/]" if lab.passed else "[red]FAIL[/]"
        console.print(f"{mark} [bold]{lab.lab}[/] ({lab.file}, {lab.seconds:.1f}s)")
        if lab.error:
            console.print(f"    [red]{lab.error}[/]")
        for check in lab.checks:
            mark = "[green]PASS[/]" if check.passed else "[red]FAIL[/]"
            covers = f" [{', '.join(check.covers)}]" if check.covers else ""
            console.print(f"  {mark} {check.name}{covers}", highlight=False)
            for row in check.evidence:
                sign = "[green]✓[/]" if row.ok else "[red]✗[/]"
                line = f"      {sign} {row.what}: observed {_short(row.observed)}"
                if not row.ok:
                    line += f"  [yellow](expected {_short(row.expected)})[/]"
                console.print(line, highlight=False, markup=True)
            if not check.passed:
                for chain in check.observation.get("path", [])[:4]:
                    stages = " → ".join(chain["stages"])
                    console.print(f"      path {chain['skb']}: {_short(stages, 300)}", highlight=False)
    checks = [c for lab in results for c in lab.checks]
    failed = [c for c in checks if not c.passed]
    labs_failed = [lab for lab in results if lab.error]
    colour = "green" if not failed and not labs_failed else "red"
    claims = sorted({claim for c in checks if c.passed for claim in c.covers})
    console.print(
        f"[{colour}]{len(checks) - len(failed)} passed, {len(failed)} failed[/]"
        f" ({len(results)} labs; claims proven: {', '.join(claims) or 'none'})"
    )


def as_json(results: list[LabResult]) -> str:
    return json.dumps([r.as_dict() for r in results], indent=2, default=str)


def as_junit(results: list[LabResult]) -> str:
    suites = ET.Element("testsuites")
    for lab in results:
        failures = sum(not c.passed for c in lab.checks)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=lab.lab,
            tests=str(len(lab.checks)),
            failures=str(failures),
            errors="1" if lab.error else "0",
            time=f"{lab.seconds:.3f}",
        )
        if lab.error:
            ET.SubElement(ET.SubElement(suite, "testcase", name="lab", classname=lab.lab), "error", message=lab.error)
        for check in lab.checks:
            case = ET.SubElement(suite, "testcase", name=check.name, classname=lab.lab, time=f"{check.seconds:.3f}")
            if not check.passed:
                bad = [r for r in check.evidence if not r.ok]
                message = "; ".join(
                    f"{r.what}: expected {_short(r.expected)}, observed {_short(r.observed)}" for r in bad
                )
                ET.SubElement(case, "failure", message=message).text = json.dumps(
                    check.as_dict(), indent=2, default=str
                )
            ET.SubElement(case, "system-out").text = json.dumps([e.as_dict() for e in check.evidence], default=str)
    return ET.tostring(suites, encoding="unicode")
