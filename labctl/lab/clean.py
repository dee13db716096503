"""``labctl clean``: remove every labctl leftover, with or without state (like ``mn -c``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from labctl.kernel import netns, tracefs
from labctl.kernel.sysctl import GlobalOverrides
from labctl.lab import relay, state


@dataclass
class Cleaned:
    relays: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    sysctls_restored: dict[str, str] = field(default_factory=dict)
    trace_instances: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)


def _owner_is_stale(owner: str) -> bool:
    """Labs always; other owners (``pid:<n>`` sessions) only when their process is gone."""
    kind, _, ident = owner.partition(":")
    if kind == "lab":
        return True
    return not (ident.isdigit() and os.path.exists(f"/proc/{ident}"))


def clean_all() -> Cleaned:
    done = Cleaned()
    done.relays = sorted(relay.find())
    relay.stop(done.relays)
    done.namespaces = netns.list_labctl()
    for name in done.namespaces:
        netns.remove(name)
    done.sysctls_restored = GlobalOverrides.release_matching(_owner_is_stale)
    done.trace_instances = tracefs.remove_stale_instances()
    done.states = state.known_labs()
    for lab in done.states:
        state.forget(lab)
    return done
