"""What the traffic commands share: the running lab they act on, a clean stop on signals, streamed output.

See :mod:`labctl.cli.traffic` for the conventions (exit codes, stdout for frames and datagrams, stderr for
the closing statistics) these helpers keep.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from labctl.cli.common import console, err_console, escape, require_root, up_lab_name

if TYPE_CHECKING:
    from labctl.lab.live import LiveLab, Stop

LabArg = Annotated[str, typer.Argument(metavar="LAB", help="lab name, or the lab file that defines it")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output (JSON lines for listen and capture)")]
CountOpt = Annotated[int, typer.Option("--count", "-n", min=1, help="how many")]
PREVIEW_BYTES = 32
POLL = 0.05  # seconds between looks at what a background reader collected


def open_lab(lab: str) -> LiveLab:
    """Resolve LAB (name or file) to the running lab; print notes about its file."""
    require_root()
    name = up_lab_name(lab)  # before live's imports (Scapy): a typo is answered at once

    from labctl.lab.live import open_lab

    live = open_lab(name, file=lab if name != lab else None)
    for warning in live.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True, highlight=False)
    return live



@contextlib.contextmanager
def stopping() -> Iterator[Stop]:
    """Ctrl-C and SIGTERM request a clean stop (sockets closed, results printed).

    A second signal raises KeyboardInterrupt, for a user who does not want
    to wait.  Handlers can only be installed from the main thread; elsewhere
    (a test calling the command in a thread) the defaults stay.
    """
    from labctl.lab.live import Stop

    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)



def line(text: str) -> None:
    """One streamed line, flushed: a pipe reader sees each frame as it comes."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()



def json_line(data: dict[str, Any]) -> None:
    line(json.dumps(data, default=str))



def say(text: str, *, err: bool = False) -> None:
    """Rich text that never wraps (CliRunner and pipes would cut it at 80 columns)."""
    (err_console if err else console).print(text, soft_wrap=True, highlight=False)



def preview(payload: bytes) -> str:
    text = repr(payload[:PREVIEW_BYTES])
    return text + "…" if len(payload) > PREVIEW_BYTES else text



def errno_list(errors: dict[str, int]) -> str:
    """``EPERM ×2 (Operation not permitted)`` for each errno."""
    parts = []
    for name, n in errors.items():
        code = getattr(errno, name, None)
        why = f" ({os.strerror(code)})" if isinstance(code, int) else ""
        parts.append(f"{name} ×{n}{why}")
    return ", ".join(parts)



def kernel_error(what: str, exc: OSError) -> Exception:
    from labctl.errors import KernelError

    name = errno.errorcode.get(exc.errno or 0, "")
    return KernelError(f"{what}: {name} {exc.strerror or exc}".strip())
