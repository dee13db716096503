"""Small JSON registries under /run/labctl, read-modify-written under a file lock.

Host-wide changes (global sysctls, kernel modules) are recorded here before
they happen, so that any later process -- ``down`` or ``clean`` after a crash
-- can undo them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

STATE_DIR = "/run/labctl"


@contextlib.contextmanager
def locked_json(path: str) -> Iterator[dict[str, Any]]:
    """Yield the registry's contents; what the body leaves in it is written back atomically."""
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                data: dict[str, Any] = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        yield data
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
