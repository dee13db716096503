"""What a run covers: the lab files under the paths given, and the checks ``-k`` selects.

Light on purpose: ``labctl run -j`` orders its labs with these before its
workers start, and must not import the code that runs a check to do it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from labctl.lab.labfile import load_lab
from labctl.topology.checks import Check, LabFile


def load_lab_file(file: str) -> LabFile:
    return load_lab(file)[0]


def lab_files(paths: Iterable[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files += sorted(str(f) for f in p.glob("*.yaml"))
        else:
            files.append(str(p))
    return files


def selected(lab: LabFile, select: str | None) -> list[Check]:
    return [c for c in lab.checks if select is None or select in c.name or select in c.covers]
