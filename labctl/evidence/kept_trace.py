"""One tracefs instance for the windows of a lab run, paused between them, instead of one per window.

Why.  Making an instance is ~45 ms of waiting (``trace_clock`` and ``buffer_size_kb`` each reset the new
ring buffer behind a ``synchronize_rcu``) and removing it as much again (``rmdir``): ~0.1 s per window,
~9 s of a serial ``labctl run labs/`` (114 windows) and ~1 s of tcp-connect, the lab that bounds
``run -j``.  Pausing and resuming an instance is a few writes.

Why nothing carries over from one window to the next.  Recording is off between windows
(``tracing_on`` 0: the kernel writes nothing into the instance); before recording resumes, whatever was
still buffered is read and thrown away, the parser's state (a partial line, a drop awaiting its stack
trace) is reset, the lost-event count starts again from the kernel's count at that moment, and exactly
the new window's events are enabled (the others disabled): a window records what a fresh instance would
have.  Attribution keeps its own guard on top: events before a window's ``since`` are never its own.

The instance lives as long as :func:`kept_traces` (a lab's checks, :func:`labctl.verify.runner.run_lab`);
outside it a window makes and removes its own instance, as before.  A window that fails stops its
instance rather than handing it on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from labctl.kernel import tracefs
from labctl.kernel.tracefs.kept import KeptSession


class TraceKeeper:
    """Holds at most one paused :class:`KeptSession` between the windows of one process."""

    def __init__(self) -> None:
        self._idle: KeptSession | None = None

    @contextlib.contextmanager
    def session(self, events: Sequence[str], buffer_kb: int) -> Iterator[tracefs.TraceSession]:
        kept, self._idle = self._idle, None
        if kept is not None and not kept.suits(events, buffer_kb):
            kept.stop()
            kept = None
        if kept is None:
            kept = KeptSession(events, buffer_kb=buffer_kb)
            kept.start()
        else:
            try:
                kept.resume(events)
            except BaseException:
                kept.stop()
                raise
        handed_back = False
        try:
            yield kept
            if kept.running and self._idle is None:
                kept.pause()
                self._idle, handed_back = kept, True
        finally:
            if not handed_back:
                kept.stop()

    def close(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.stop()


_keeper: TraceKeeper | None = None


@contextlib.contextmanager
def kept_traces() -> Iterator[None]:
    """Windows opened inside share one tracefs instance (see the module's docstring); removed on exit."""
    global _keeper
    if _keeper is not None:  # nested: the outer scope keeps it
        yield
        return
    _keeper = TraceKeeper()
    try:
        yield
    finally:
        keeper, _keeper = _keeper, None
        keeper.close()


def trace_session(events: Sequence[str], buffer_kb: int) -> contextlib.AbstractContextManager[tracefs.TraceSession]:
    """A recording session for one window: the kept instance inside :func:`kept_traces`, else a new one."""
    if _keeper is not None:
        return _keeper.session(events, buffer_kb)
    return tracefs.TraceSession(events, buffer_kb=buffer_kb)


def stop_recording(session: tracefs.TraceSession) -> None:
    """End a window's recording: pause a kept instance (the keeper decides its fate), stop any other."""
    if isinstance(session, KeptSession):
        session.pause()
    else:
        session.stop()
