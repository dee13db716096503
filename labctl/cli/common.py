"""What every command shares: error reporting, root check, resolving LAB|FILE."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from labctl.errors import LabctlError, LabFileError, Problem
from labctl.names import lab_name_problem

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


class _LazyConsole:
    """A Rich console made on first use: importing Rich costs more than ``labctl --help`` may."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return getattr(self._console, name)


console: Console = _LazyConsole()  # type: ignore[assignment]
err_console: Console = _LazyConsole(stderr=True)  # type: ignore[assignment]


_SIMPLE_MARKUP = re.compile(r"\[/?[a-z ]*\]")


def say(markup: str) -> None:
    """One line with simple Rich markup (``[bold]…[/]``): through Rich on a terminal, as plain text into a pipe.

    ``labctl up`` and ``down`` print one such line; importing Rich and its console for it costs
    more than 0.03 s of a command a script runs hundreds of times (bench/bench_cli.py).
    """
    if sys.stdout.isatty() or "\\" in markup:
        console.print(markup)
        return
    sys.stdout.write(_SIMPLE_MARKUP.sub("", markup) + "\n")


def plain(text: str) -> None:
    """One line of literal text (a name or a kernel's words, never markup): through Rich on a terminal,
    unhighlighted and unwrapped, as it is into a pipe (without importing Rich)."""
    if sys.stdout.isatty():
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    sys.stdout.write(text + "\n")


def escape(text: str) -> str:
    """Rich's markup escape, imported on first use (Rich is not imported by commands that print plainly)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def reports_errors(func: F) -> F:
    """Turn labctl errors into a red message and their exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LabctlError as exc:
            # a caret line (it starts with spaces) stays under its word after the "error: " prefix
            text = "\n".join(" " * 7 + line if line.startswith(" ") else line for line in str(exc).split("\n"))
            from rich.markup import escape  # the text quotes a file anyone may have written: never markup

            err_console.print(
                f"[bold red]error:[/] {escape(text)}", highlight=False, markup=True, soft_wrap=True, emoji=False
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabctlError("labctl builds kernel objects and needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)")


def lab_name(lab_or_file: str) -> str:
    """Accept a lab name or the lab file that defines it; either way a valid lab name comes back.

    The name becomes file names under /run/labctl, so it is checked here even
    when it comes from a file that was not validated (``down FILE``).
    """
    name = _lab_name(lab_or_file)
    problem = lab_name_problem(name)  # names.py, not the pydantic model: ``down`` never imports it
    if problem is not None:
        raise LabFileError([Problem(("name",), problem, lab_or_file)])
    return name


def up_lab_name(lab_or_file: str) -> str:
    """:func:`lab_name`, and the lab must be up -- checked before any heavy import (Scapy, python-iptables).

    A typo in a lab name is answered in a blink and with the one "not up" error (exit 2).
    """
    from labctl.errors import LabNotUpError
    from labctl.kernel import netns
    from labctl.lab import state

    name = lab_name(lab_or_file)
    if not netns.list_labctl(name) and state.load(name) is None:
        from labctl.lab.status import running_labs

        up = ", ".join(running_labs()) or "none"
        raise LabNotUpError(f"lab {name} is not up (labs up: {up}); run labctl up FILE first")
    return name


def _lab_name(lab_or_file: str) -> str:
    if lab_or_file.endswith((".yaml", ".yml")) or os.path.sep in lab_or_file:
        from labctl.topology.loader import default_name, read_lab_text, read_yaml

        if not os.path.exists(lab_or_file):
            raise LabFileError([Problem((), "no such file", lab_or_file)])
        # the loader's reader: a directory, FIFO, /dev/zero or non-UTF-8 file is a message, never a hang
        data, _ = read_yaml(read_lab_text(lab_or_file), lab_or_file)
        name = data.get("name") if isinstance(data, dict) else None
        return str(name) if name else default_name(lab_or_file)
    return lab_or_file


def print_json(data: Any) -> None:
    """Indented on a terminal; compact into a pipe (json's C encoder works only without indent: 10x faster)."""
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(data, indent=indent, default=str) + "\n")
