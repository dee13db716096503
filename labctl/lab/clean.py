"""``labctl clean``: remove every labctl leftover, with or without state (like ``mn -c``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from labctl.errors import LabStateError
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
    busy: list[str] = field(default_factory=list)
    """Labs left alone because another labctl command holds their lock."""


def _owner_is_stale(owner: str) -> bool:
    """Non-lab owners (``pid:<n>`` sessions) are stale when their process is gone."""
    kind, _, ident = owner.partition(":")
    return kind != "lab" and not (ident.isdigit() and os.path.exists(f"/proc/{ident}"))


def _labs_with_leftovers() -> set[str]:
    """Every lab anything is left of: state, namespaces, relays, or host-wide overrides it holds."""
    found = set(state.known_labs())
    found |= {parts[0] for n in netns.list_labctl() if (parts := netns.split_namespace_name(n))}
    found |= {lab for lab, _ in relay.find().values()}
    owners = [o for holders in GlobalOverrides.owners().values() for o in holders]
    owners += [o for holders in modules.owners().values() for o in holders]
    found |= {o.partition(":")[2] for o in owners if o.startswith("lab:")}
    return found


def _clean_lab(lab: str, done: Cleaned) -> None:
    pids = sorted(relay.find(lab))
    relay.stop(pids)
    done.relays += pids
    for name in netns.list_labctl(lab):
        netns.remove(name)
        done.namespaces.append(name)
    done.sysctls_restored.update(GlobalOverrides.release(f"lab:{lab}"))
    modules.release(f"lab:{lab}")
    if state.load(lab) is not None:
        state.forget(lab)
        done.states.append(lab)


def clean_all(lab: str | None = None) -> Cleaned:
    """Remove every leftover of ``lab`` (of every lab when None), state or no state.

    Each lab is cleaned under its own lock, so a clean never tears a lab down
    in the middle of its up; a lab whose lock stays held is reported as busy.
    """
    done = Cleaned()
    for name in sorted([lab] if lab else _labs_with_leftovers()):
        try:
            with state.locked(name, wait=2.0):
                _clean_lab(name, done)
        except LabStateError:
            done.busy.append(name)
    if lab is None:
        done.sysctls_restored.update(GlobalOverrides.release_matching(_owner_is_stale))
        done.trace_instances = tracefs.remove_stale_instances()
        up = {parts[0] for n in netns.list_labctl() if (parts := netns.split_namespace_name(n))}
        state.remove_lock_files(keep=up | set(done.busy))
    return done
