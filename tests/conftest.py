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


@pytest.fixture(autouse=True)
def _fresh_cli_consoles() -> Iterator[None]:
    """Each test's CLI output gets a Rich console made at its first print, as a new ``labctl`` process does.

    The CLI's consoles are made once per process (labctl.cli.common); in a test worker the first test to print
    would otherwise fix the width for every later one (``COLUMNS`` of a CliRunner env is read when the console
    is made), and a table cut at 80 columns failed a test that asked for 250 -- depending on test order."""
    from labctl.cli import common

    for lazy in (common.console, common.err_console):
        lazy._console = None  # type: ignore[attr-defined]
    yield
