"""The processes ``labctl run -j`` and the mutation suite run labs in: a fork server that has imported what a
lab runs, the workers forked from it, and the end of both.

Light on purpose (it imports no lab code): ``labctl run -j`` starts the fork server before it imports
anything else, so that the server's second of imports runs beside labctl's own start-up and the ordering
of the labs, not after them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from multiprocessing.context import BaseContext

from labctl.expect.base import KIND_MODULES

WORKER_PRELOAD = (
    "labctl.verify.parallel",
    "labctl.verify.runner",
    "labctl.verify.mutate",
    # what the labs import on first use, inside a check or a build step
    *(f"labctl.expect.kinds.{module}" for module in sorted(set(KIND_MODULES.values()))),
    "labctl.expect.validate",
    "labctl.expect.walks",
    "labctl.lab.facts",
    "labctl.lab.virtual",
    "labctl.kernel.tc_flower",
    "labctl.kernel.xtables",
    "labctl.traffic.expr",  # first: it turns off Scapy's route autoload, so the server never reads the host's routes
    "scapy.layers.l2",
    "scapy.layers.inet",
    "scapy.layers.inet6",
    "nftables",
)
"""What a lab worker runs, imported once by the fork server rather than by every worker (0.7-0.9 s of CPU
each: pyroute2, Scapy, python-iptables; six workers re-importing were a fifth of a -j 6 run's CPU).

Not only the runner: a serial run of labs/ imports some 260 modules more on first use (pyroute2, Scapy's
layers, the expectation kinds).  Each worker paid them again on its first lab -- tcp-connect, the lab
that bounds ``run -j``, spent a second of a profiled run importing -- where the fork server, preloading them,
takes a quarter of a second longer to start.  tests/lab/test_parallel.py checks it against one lab's imports."""


def worker_context() -> BaseContext:
    """Where lab workers come from: forked from a fork server that has imported :data:`WORKER_PRELOAD`.

    Not plain fork: the parent has threads (the progress spinner) and may hold netlink sockets, which a
    forked worker would inherit mid-use.  The fork server is a fresh interpreter (as spawn would start)
    that only imports: no thread, no socket, so each worker forked from it starts clean and has nothing
    left to import.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    return context


def start_fork_server() -> BaseContext:
    """:func:`worker_context`, with its server started now (it imports while the caller goes on)."""
    from multiprocessing import forkserver

    context = worker_context()
    forkserver.ensure_running()
    return context


@contextlib.contextmanager
def fork_server_started(wanted: bool) -> Iterator[None]:
    """Start the fork server now when ``wanted``, and stop it on the way out (it is not needed after all when
    the run turns out serial or its arguments are bad)."""
    if not wanted:
        yield
        return
    start_fork_server()
    try:
        yield
    finally:  # the runs in between stopped the server they used, after their workers: only a spare is left
        stop_fork_server(drained=True)


def stop_fork_server(drained: bool) -> None:
    """Stop the fork server, and wait for it.

    The workers are the fork server's children, not this process's: it reaps them, and only once it is
    itself reaped here does their CPU time count in this process's ``RUSAGE_CHILDREN`` (what a benchmark
    or ``time`` reports for ``labctl run -j``).  Left running, it would exit with this process and be
    reaped by init, its workers' CPU unaccounted.

    ``drained``: the pool shut down normally, so the server is killed, not asked to exit: asked, it unwinds
    an interpreter that imported the whole worker (:data:`WORKER_PRELOAD`), 0.15-0.2 s that every
    ``run -j`` waited for at its end.  It holds nothing to clean up, and the workers it forked are already
    reaped: the pool joined each of them, and a forkserver worker's join returns only once the server has
    sent its exit status.  Otherwise (Ctrl-C, an error) workers may still be taking their labs down: the
    server is asked to exit, which it does only once every worker has let go of its liveness pipe, so
    labctl does not return -- nor remove the run's lock -- under labs still coming down.
    """
    import signal
    from multiprocessing import forkserver

    server = forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if drained and pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(AttributeError, OSError):
        server._stop()  # type: ignore[attr-defined]
