"""Taking a lab down, and undoing a failed ``up``: namespaces, relays, host-wide overrides, state.

Its own module so that ``labctl down`` imports only this (netns, relay, state, the override
registries), not the build's steps and what they import: 0.02 s of a command a script runs once per
lab (bench/bench_cli.py, up+down).
"""

from __future__ import annotations

import contextlib

from labctl.kernel import modules, netns
from labctl.kernel.sysctl import GlobalOverrides
from labctl.lab import relay, state


def owner(lab: str) -> str:
    """The name under which a lab holds host-wide sysctl overrides."""
    return f"lab:{lab}"


def rollback(relays: list[int], namespaces: list[str], lab: str, first_up: bool) -> None:
    """Undo what one ``up`` created: its relays and namespaces; on a first up also the lab's overrides."""
    relay.stop(relays)
    for name in reversed(namespaces):
        with contextlib.suppress(OSError):
            netns.remove(name)
    if first_up:
        GlobalOverrides.release(owner(lab))
        modules.release(owner(lab))


def down(lab: str) -> list[str]:
    """Remove everything of ``lab`` -- by name, so it works without (or with stale) state."""
    with state.locked(lab):
        relay.stop(list(relay.find(lab)))
        removed = netns.list_labctl(lab)
        for name in removed:
            netns.remove(name)
        GlobalOverrides.release(owner(lab))
        modules.release(owner(lab))
        state.forget(lab)
        return removed
