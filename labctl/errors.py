"""Errors users see, with enough context to fix their input.

Every error that comes from a lab file names the file, the line and the key
path, so a user can go straight to it; the CLI maps these classes onto exit
codes (2 for bad input, 1 for everything the kernel or the machine refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KeyPath = tuple[str | int, ...]


def format_key(path: KeyPath) -> str:
    """``('topology', 'nodes', 'h1', 'routes', 0, 'via')`` -> ``topology.nodes.h1.routes[0].via``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
    return text or "(top level)"


class LabctlError(Exception):
    """An error meant for the user; its text is the whole message."""

    exit_code = 1


@dataclass
class Problem:
    """One thing wrong with a lab file; line is None when the key is absent from the file."""

    path: KeyPath
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "<lab>"
        if self.line is not None:
            where += f":{self.line}"
        return problem_text(where, format_key(self.path), self.message)


def problem_text(where: str, key: str, message: str) -> str:
    """``where: key: message``, printable, with continuation lines (a caret) aligned under the message."""
    lines = message.split("\n")[:MESSAGE_LINES]
    prefix = f"{_printable(where)}: {_printable(key)}: "
    return prefix + f"\n{' ' * len(prefix)}".join(_printable(line) for line in lines)


MESSAGE_MAX = 400
"""Characters per line of a problem: it names the place, it never quotes a file."""
MESSAGE_LINES = 3
"""A problem is one line, plus at most a rule and a caret under the bad word (iptables.RuleError)."""


def _printable(text: str) -> str:
    """``text`` with control characters shown escaped, cut to MESSAGE_MAX characters.

    Keys and values come from a file anyone may have written; printed raw,
    a newline would forge another problem line and an escape sequence would
    rewrite the terminal.  (Values with control characters are refused by the
    loader, so only labctl's own caret lines have newlines.)
    """
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return clean if len(clean) <= MESSAGE_MAX else clean[: MESSAGE_MAX - 1] + "…"


@dataclass
class LabFileError(LabctlError):
    """A lab file is unreadable or invalid; nothing has been built."""

    problems: list[Problem] = field(default_factory=list)
    exit_code = 2

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclass
class KernelLacksError(LabFileError):
    """The lab file is valid but asks for kinds or features this kernel is built without.

    ``lacking`` names the options; ``labctl run`` reports such a lab as SKIP
    (not provable here), ``up`` and ``validate`` as an error (exit 2).
    """

    lacking: list[str] = field(default_factory=list)


class LabStateError(LabctlError):
    """The lab is not in a state that allows the request (not up, locked, ...)."""


class LabNotUpError(LabStateError):
    """The named lab (or node) is not up: nothing of it exists.  Exit 2 for every command.

    The one "unknown lab" error, so that a typo in a lab name is the same exit
    code whichever command it was given to (``down``, ``rules`` and ``status`` alike).
    """

    exit_code = 2


class CommandError(LabctlError):
    """``exec``'s command could not be run: 127 (not found) or 126 (not executable), as env(1) says."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class KernelError(LabctlError):
    """The kernel refused an operation; the message names the object."""


class BadNameError(LabctlError, ValueError):
    """A lab, node or interface name given by the user is not acceptable; nothing was done.

    A ValueError too, so a pydantic validator reports it at the key that holds the name.
    """

    exit_code = 2


class UnsafePathError(LabctlError):
    """A file or directory where labctl keeps its state is not labctl's own (a symlink, another owner).

    labctl runs as root: it refuses to touch such a path rather than follow it.
    """
