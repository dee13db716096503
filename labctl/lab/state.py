"""Per-lab state under /run/labctl, and the per-lab lock.

State is a convenience, never the only record: namespaces carry the lab's
name (``labctl-<lab>.<node>``), relays carry it on their command line and
global sysctls are owned by ``lab:<name>`` in the overrides registry, so
``down`` and ``clean`` work even when a crash left no state file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from labctl.errors import LabStateError
from labctl.kernel.registry import STATE_DIR

LABS_DIR = os.path.join(STATE_DIR, "labs")


@dataclass
class LabState:
    name: str
    file: str
    status: str  # "building" | "up"
    nodes: dict[str, str]  # node -> namespace
    relays: dict[str, int] = field(default_factory=dict)  # vm node -> relay pid
    started: float = field(default_factory=time.time)
    digest: str = ""


def digest(topo: Any) -> str:
    """A short fingerprint of a topology, to tell whether a lab's file changed since ``up``."""
    return hashlib.sha256(json.dumps(topo.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _ensure_dir() -> None:
    os.makedirs(LABS_DIR, mode=0o700, exist_ok=True)
    os.chmod(STATE_DIR, 0o700)


def state_path(lab: str) -> str:
    return os.path.join(LABS_DIR, f"{lab}.json")


def load(lab: str) -> LabState | None:
    try:
        with open(state_path(lab)) as f:
            data: dict[str, Any] = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return LabState(**data)


def save(state: LabState) -> None:
    _ensure_dir()
    tmp = state_path(state.name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(state), f, indent=2)
    os.replace(tmp, state_path(state.name))


def forget(lab: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(lab))


def known_labs() -> list[str]:
    try:
        return sorted(n[:-5] for n in os.listdir(LABS_DIR) if n.endswith(".json"))
    except FileNotFoundError:
        return []


def remove_lock_files(keep: set[str]) -> None:
    """Lock files of labs that are gone (``clean``); a lock in use is never removed."""
    try:
        names = os.listdir(LABS_DIR)
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".lock") or name[:-5] in keep:
            continue
        path = os.path.join(LABS_DIR, name)
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            os.unlink(path)


@contextlib.contextmanager
def locked(lab: str, wait: float = 10.0) -> Iterator[None]:
    """Hold the lab's lock; two commands on one lab never interleave."""
    _ensure_dir()
    with open(os.path.join(LABS_DIR, f"{lab}.lock"), "a") as lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabStateError(f"lab {lab} is locked by another labctl command") from None
                time.sleep(0.05)
        yield
