"""When a lab may act while other labs run (``labctl run -j``, ``pytest -n``): the interface the runner asks.

The policy is labctl/verify/parallel.py's; this module is small so that the pytest plugin, which every
pytest session loads, can name it without importing the runner.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Protocol

from labctl.topology.checks import Check


class Turns(Protocol):
    """When a lab may act, with other labs running at the same time (labctl/verify/parallel.py)."""

    def lab(self) -> AbstractContextManager[None]:
        """Held from before the lab's up to after its down."""
        ...

    def phase(self, check: Check | None = None) -> AbstractContextManager[None]:
        """Held while the lab builds (None), runs ``check``, or tears down (None)."""
        ...


class Alone:
    """The lab is the only one: it never waits."""

    def lab(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def phase(self, check: Check | None = None) -> AbstractContextManager[None]:
        return contextlib.nullcontext()
