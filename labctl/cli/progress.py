"""Rich progress for what takes more than a second: ``up`` of a large lab, ``run`` of a folder.

The lab and verify layers only call a plain callback (``progress(step,
done, total)``, ``on_check(lab, check)``); drawing is the CLI's business.  A
bar is drawn on stderr only when both stdout and stderr are terminals:
piped or redirected output (CI logs, ``| tee``, ``--json``) gets nothing
extra, and the bar is transient, so the terminal keeps only the result.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

from labctl.cli.common import console, err_console

BuildProgress = Callable[[str, int, int], None]
CheckProgress = Callable[[str, str], None]


def interactive() -> bool:
    """Both streams are terminals (Rich is asked only then: importing it costs a piped ``up`` 0.03 s)."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return False
    return bool(console.is_terminal and err_console.is_terminal)


def _bar() -> object:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


@contextlib.contextmanager
def building(lab: str, enabled: bool = True) -> Iterator[BuildProgress | None]:
    """A callback for :func:`labctl.lab.build.up` (None when nothing is to be drawn)."""
    if not (enabled and interactive()):
        yield None
        return
    progress = _bar()
    with progress:  # type: ignore[attr-defined]
        task = progress.add_task(f"up {lab}", total=None)  # type: ignore[attr-defined]

        def step(name: str, done: int, total: int) -> None:
            progress.update(task, description=f"up {lab}: {name}", completed=done, total=total)  # type: ignore[attr-defined]

        yield step


@contextlib.contextmanager
def checking(files: Sequence[str], select: str | None, enabled: bool = True) -> Iterator[CheckProgress | None]:
    """A callback for :func:`labctl.verify.runner.run_lab` over ``files``, with a bar over all their checks."""
    if not (enabled and interactive()):
        yield None
        return
    total = _count_checks(files, select)
    progress = _bar()
    with progress:  # type: ignore[attr-defined]
        task = progress.add_task("starting", total=total or None)  # type: ignore[attr-defined]
        seen = [0]

        def show(lab: str, check: str) -> None:
            # called as each check starts: the ones before it are done
            progress.update(task, description=f"{lab}: {check}", completed=seen[0])  # type: ignore[attr-defined]
            seen[0] += 1

        yield show


def _count_checks(files: Sequence[str], select: str | None) -> int:
    """How many checks the run will make (a file that does not load counts none: the run reports it)."""
    from labctl.errors import LabctlError
    from labctl.verify.scope import load_lab_file, selected

    total = 0
    for file in files:
        with contextlib.suppress(LabctlError, OSError):
            total += len(selected(load_lab_file(file), select))
    return total
