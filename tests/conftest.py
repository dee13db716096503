"""Shared fixtures: unique lab names, labs that always come down, host snapshots."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labctl.lab import build
from labctl.lab.labfile import load_lab
from labctl.topology.model import Topology

_counter = itertools.count()


@pytest.fixture
def lab_name() -> str:
    """A lab name no other test (or concurrent run) uses."""
    return f"t{os.getpid()}x{next(_counter)}"


LabFactory = Callable[[str], Topology]


@pytest.fixture
def make_lab(tmp_path: Path, lab_name: str) -> Iterator[LabFactory]:
    """Write a lab file (``name`` is filled in), bring it up, and always bring it down."""
    names: list[str] = []

    def factory(body: str, name: str | None = None) -> Topology:
        lab = name or lab_name
        file = tmp_path / f"{lab}.yaml"
        file.write_text(f"name: {lab}\n{body}")
        topo, _ = load_lab(str(file))
        names.append(lab)
        build.up(topo, str(file))
        return topo

    yield factory
    for lab in names:
        build.down(lab)
