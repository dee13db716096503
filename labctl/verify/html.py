"""``labctl run --html report.html``: one self-contained page of a run.

Per lab and check: the verdict, the evidence rows (expected, observed, hint,
detail), the words of a failure, a picture of each kind of path the check's
packets took (inline SVG drawn over the lab's topology by
:mod:`labctl.lab.trace.picture`, the code ``labctl trace -o`` uses), and
links to the pcap files of the check's captures, written beside the page in
``<report>-pcaps/``.  The CSS is inline and nothing is fetched: the page
opens offline, from a CI artefact or a mail attachment.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labctl.errors import LabctlError
from labctl.kernel.frames import write_pcap
from labctl.lab.trace.model import PacketPath
from labctl.topology.model import Topology
from labctl.verify.report import claims
from labctl.verify.results import CheckResult, LabResult

MAX_PICTURES = 6
"""Kinds of path drawn per check, of the packets it sent and of those the kernel made; the rest are counted."""

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em; color: #1d2330; }
h1 { margin-bottom: .2em; } .meta { color: #5a6270; margin-bottom: 1.5em; }
.badge { display: inline-block; padding: .1em .55em; border-radius: .3em; color: #fff; font-weight: 600;
  font-size: .85em; margin-right: .4em; }
.pass > .badge, .badge.pass { background: #2e7d32; } .fail > .badge, .badge.fail { background: #c62828; }
.error > .badge, .badge.error { background: #8e24aa; } .skip > .badge, .badge.skip { background: #f9a825; }
section.lab { border-top: 3px solid #d0d7e2; margin-top: 2em; padding-top: .5em; }
article.check { border: 1px solid #d0d7e2; border-left: 6px solid #2e7d32; border-radius: .4em;
  padding: .6em 1em; margin: 1em 0; background: #fbfcfe; }
article.check.fail { border-left-color: #c62828; } article.check.error { border-left-color: #8e24aa; }
article.check.skip { border-left-color: #f9a825; }
article.check h3 { margin: .2em 0 .4em 0; font-size: 1.1em; }
.claims { color: #1f5fbf; font-weight: 600; } .desc { color: #3c4450; margin: .2em 0 .6em 0; }
table.rows { border-collapse: collapse; width: 100%; font-size: .9em; margin: .4em 0; }
table.rows th, table.rows td { border: 1px solid #e0e5ee; padding: .25em .5em; text-align: left; vertical-align: top; }
table.rows th { background: #eef2f8; } tr.bad td { background: #fff2f2; }
td.ok { color: #2e7d32; font-weight: 700; } td.no { color: #c62828; font-weight: 700; }
code, pre { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: .85em; }
pre { background: #f3f5f9; padding: .5em; overflow-x: auto; white-space: pre-wrap; }
.hint { color: #00838f; } figure.path { margin: .8em 0; overflow-x: auto; }
figure.path figcaption { font-size: .85em; color: #5a6270; } figure.path svg { max-width: 100%; height: auto; }
.pcaps span { margin-right: 1.5em; }
ul.contents { list-style: none; padding-left: 0; } ul.contents li { margin: .2em 0; }
a.fail, a.error { color: #c62828; } .summary span { margin-right: 1em; }
"""


def _e(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return html.escape(text)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


class HtmlReport:
    """Builds the page; ``topology_of`` gives a lab file's topology (None: draw no picture)."""

    def __init__(self, output: Path, topology_of: Callable[[str], Topology | None]) -> None:
        self.output = output
        self.topology_of = topology_of
        self.pcap_dir = output.with_name(output.stem + "-pcaps")
        self._figures: dict[int, str] = {}

    def write(self, results: list[LabResult]) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._draw_all(results)
        parts = [self._head(results)]
        for lab in results:
            parts.append(self._lab(lab))
        parts.append("</body></html>\n")
        self.output.write_text("".join(parts), encoding="utf-8")

    def _draw_all(self, results: list[LabResult]) -> None:
        """Every check's pictures, Graphviz processes run side by side (one per CPU)."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = []
        for lab in results:
            topo = self.topology_of(lab.file) if lab.checks else None
            if topo is not None:
                jobs += [(topo, check) for check in lab.checks if check.recorded is not None]
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            drawn = pool.map(lambda job: _pictures(*job), jobs)
            self._figures = {id(check): figures for (_, check), figures in zip(jobs, drawn, strict=True)}

    # ------------------------------------------------------------ page parts

    def _head(self, results: list[LabResult]) -> str:
        checks = [c for lab in results for c in lab.checks]
        counted = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "error", "skip")}
        verdicts = claims(results)
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        summary = " ".join(f'<span class="badge {s}">{n} {s}</span>' for s, n in counted.items())
        not_provable = ", ".join(f"{c} (lacks {', '.join(o)})" for c, o in verdicts.not_provable.items())
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>labctl run: {counted['pass']} passed, {counted['fail'] + counted['error']} failed</title>"
            f"<style>{CSS}</style></head><body>"
            "<h1>labctl run</h1>"
            f'<div class="meta">{_e(when)} · kernel {_e(platform.release())} · {len(results)} labs</div>'
            f'<div class="summary">{summary}</div>'
            f"<p>claims proven on this kernel: <b>{_e(', '.join(verdicts.proven) or 'none')}</b>"
            + (f"<br>claims not proven: <b>{_e(', '.join(verdicts.failed))}</b>" if verdicts.failed else "")
            + (f"<br>not provable here: {_e(not_provable)}" if not_provable else "")
            + "</p>"
            + _contents(results)
        )

    def _lab(self, lab: LabResult) -> str:
        status = "pass" if lab.passed else "fail"
        out = [
            f'<section class="lab {status}" id="lab-{_safe(lab.lab)}">'
            f'<h2 class="{status}"><span class="badge">{status.upper()}</span>{_e(lab.lab)}</h2>'
            f'<div class="meta">{_e(lab.file)} · {lab.seconds:.1f} s</div>'
        ]
        if lab.error:
            out.append(f"<pre>{_e(lab.error)}</pre>")
        for check in lab.checks:
            out.append(self._check(lab, check))
        out.append("</section>")
        return "".join(out)

    def _check(self, lab: LabResult, check: CheckResult) -> str:
        covers = f' <span class="claims">[{_e(", ".join(check.covers))}]</span>' if check.covers else ""
        out = [
            f'<article class="check {check.status}" id="{_safe(lab.lab)}--{_safe(check.name)}">'
            f'<h3 class="{check.status}"><span class="badge">{check.status.upper()}</span>'
            f"{_e(check.name)}{covers} <small>{check.seconds:.2f} s</small></h3>"
        ]
        if check.description:
            out.append(f'<div class="desc">{_e(check.description)}</div>')
        out.append(_rows(check))
        if check.status == "error" and check.error:
            out.append(f"<pre>{_e(check.error)}</pre>")
        if check.explanation:
            out.append(f"<pre>{_e(chr(10).join(check.explanation))}</pre>")
        out.append(self._pcaps(lab, check))
        out.append(self._figures.get(id(check), ""))
        out.append("</article>")
        return "".join(out)

    def _pcaps(self, lab: LabResult, check: CheckResult) -> str:
        if check.recorded is None or not check.recorded.captures:
            return ""
        links = []
        for key, capture in check.recorded.captures.items():
            self.pcap_dir.mkdir(parents=True, exist_ok=True)
            name = f"{_safe(lab.lab)}--{_safe(check.name)}--{_safe(key)}.pcap"
            write_pcap(self.pcap_dir / name, capture.captured)
            href = html.escape(f"{self.pcap_dir.name}/{name}", quote=True)
            lost = f", {capture.dropped} lost" if capture.dropped else ""
            noun = "frame" if capture.frames == 1 else "frames"
            links.append(f'<span><a href="{href}">{_e(key)}.pcap</a> ({capture.frames} {noun}{lost})</span>')
        return f'<div class="pcaps">captures: {"".join(links)}</div>'


def _contents(results: list[LabResult]) -> str:
    """One line per lab, linking to it and to each check that did not pass."""
    items = []
    for lab in results:
        status = "pass" if lab.passed else "fail"
        bad = [
            f'<a href="#{_safe(lab.lab)}--{_safe(c.name)}" class="{c.status}">{_e(c.name)} ({c.status})</a>'
            for c in lab.checks
            if c.status in ("fail", "error")
        ]
        tail = f" — {', '.join(bad)}" if bad else ""
        count = f"{sum(c.passed for c in lab.checks)}/{len(lab.checks)} checks passed"
        items.append(
            f'<li><span class="badge {status}">{status.upper()}</span>'
            f'<a href="#lab-{_safe(lab.lab)}">{_e(lab.lab)}</a> <small>{count}</small>{tail}</li>'
        )
    return f'<ul class="contents">{"".join(items)}</ul>'


def _rows(check: CheckResult) -> str:
    head = "<tr><th></th><th>what</th><th>expected</th><th>observed</th><th>hint / detail</th></tr>"
    rows = [f'<table class="rows">{head}']
    for row in check.evidence:
        mark = '<td class="ok">✓</td>' if row.ok else '<td class="no">✗</td>'
        notes = []
        if row.hint:
            notes.append(f'<span class="hint">hint: {_e(row.hint)}</span>')
        notes += [f"<code>{_e(line)}</code>" for line in row.detail]
        rows.append(
            f'<tr class="{"good" if row.ok else "bad"}">{mark}<td>{_e(row.what)}</td>'
            f"<td><code>{_e(row.expected)}</code></td><td><code>{_e(row.observed)}</code></td>"
            f"<td>{'<br>'.join(notes)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _pictures(topo: Topology, check: CheckResult) -> str:
    from labctl.lab.trace.picture import ending_words, path_svg
    from labctl.lab.trace.replay import evidence_paths, walks_for

    evidence = check.recorded
    if evidence is None or not evidence.packets:
        return ""
    try:
        paths = evidence_paths(topo, evidence)
        walks = walks_for(evidence, paths)
        groups: dict[Any, list[tuple[PacketPath, dict[str, list[str]]]]] = {}
        for path, walk in zip(paths, walks, strict=True):
            key = (path.signature(), tuple((n, tuple(w)) for n, w in sorted(walk.items())))
            groups.setdefault(key, []).append((path, walk))
        sent: list[str] = []
        related: list[str] = []
        for members in groups.values():
            path, walk = members[0]
            shelf = sent if path.role == "injected" else related
            if len(shelf) >= MAX_PICTURES:
                continue
            caption = f"packet {path.index + 1}" + (f" ({path.kind})" if path.kind else "")
            if len(members) > 1:
                caption += f" and {len(members) - 1} more like it"
            svg = path_svg(topo, path, title=caption, walks=walk)
            words = " · ".join(ending_words(path.ending))
            shelf.append(f'<figure class="path">{svg}<figcaption>{_e(words)}</figcaption></figure>')
        figures = list(sent)
        if related:  # ARP exchanges, ICMP errors, replies: there, but not what the check is about
            noun = "kind of path" if len(related) == 1 else "kinds of path"
            figures.append(
                f"<details><summary>{len(related)} {noun} of packets the kernel made on the way"
                f" (ARP, replies, ICMP errors)</summary>{''.join(related)}</details>"
            )
    except LabctlError as exc:  # no Graphviz: the page still has every row
        return f"<p><i>no picture: {_e(str(exc))}</i></p>"
    drawn = sum(len(p.events) for p in paths) == sum(len(p.events) for p in evidence.packets)
    tail = "" if drawn else f"<p><small>the first {len(paths)} packets are drawn; --json has them all</small></p>"
    left = len(groups) - len(sent) - len(related)
    if left > 0:
        tail += f"<p><small>{left} more kinds of path not drawn</small></p>"
    return "".join(figures) + tail


def write_report(output: str | os.PathLike[str], results: list[LabResult]) -> Path:
    """Write the page (and its pcaps beside it); the topology of each lab is read from its file again."""
    from labctl.lab.labfile import load_lab

    def topology_of(file: str) -> Topology | None:
        try:
            return load_lab(file)[0]
        except LabctlError:
            return None

    path = Path(output)
    try:
        HtmlReport(path, topology_of).write(results)
    except OSError as exc:
        raise LabctlError(f"{output}: cannot write the report: {exc.strerror or exc}") from None
    return path
