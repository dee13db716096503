"""``labctl clean``: remove every labctl leftover, with or without state (like ``mn -c``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from labctl.kernel import modules, netns, tracefs
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


def clean_all(lab: str | None = None) -> Cleaned:
    """Remove every leftover of ``lab`` (of every lab when None), state or no state."""
    done = Cleaned()
    done.relays = sorted(relay.find(lab))
    relay.stop(done.relays)
    done.namespaces = netns.list_labctl(lab)
    for name in done.namespaces:
        netns.remove(name)
    if lab is None:
        done.sysctls_restored = GlobalOverrides.release_matching(_owner_is_stale)
        done.trace_instances = tracefs.remove_stale_instances()
        done.states = state.known_labs()
    else:
        done.sysctls_restored = GlobalOverrides.release(f"lab:{lab}")
        done.states = [lab] if state.load(lab) else []
    for holders in modules.owners().values():
        for owner in holders:
            if owner.startswith("lab:") and (lab is None or owner == f"lab:{lab}"):
                modules.release(owner)
    for name in done.states:
        state.forget(name)
    if lab is None:
        up = {parts[0] for n in netns.list_labctl() if (parts := netns.split_namespace_name(n))}
        state.remove_lock_files(keep=up)
    return done
