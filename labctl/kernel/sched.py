"""Which CPU the calling thread runs on, for experiments that need two CPUs (RPS)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Pin the calling thread to ``cpu`` for the body (sched_setaffinity(0) is per thread).

    RPS steers a packet to another CPU's backlog only when the sender runs
    elsewhere; None leaves the scheduler alone.
    """
    if cpu is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
