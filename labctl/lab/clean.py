"""``labctl clean``: remove every labctl leftover, with or without state (like ``mn -c``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from labctl.errors import LabStateError
from labctl.kernel import modules, netns, procs
from labctl.kernel.sysctl import GlobalOverrides
from labctl.lab import relay, state
from labctl.names import check_lab_name, lab_name_problem, scratch_owner


@dataclass
class Cleaned:
    relays: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    """Lab namespaces, and scratch namespaces (``labctl-ebdiag<pid>.<tid>``) whose process is gone."""
    sysctls_restored: dict[str, str] = field(default_factory=dict)
    trace_instances: list[str] = field(default_factory=list)
    trace_rules: list[str] = field(default_factory=list)
    """``namespace:tag`` of hook-trace rules a killed tracer left in a lab that is still up."""
    states: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    """Labs left alone because another labctl command holds their lock."""


def _owner_is_stale(owner: str) -> bool:
    """Non-lab owners (``pid:<n>`` sessions) are stale when their process is gone."""
    kind, _, ident = owner.partition(":")
    return kind != "lab" and not (ident.isdigit() and os.path.exists(f"/proc/{ident}"))


def _lab_namespaces() -> set[str]:
    """Labs that have namespaces (scratch namespaces are not labs: they are reclaimed by owner pid)."""
    return {
        parts[0]
        for n in netns.list_labctl()
        if scratch_owner(n) is None and (parts := netns.split_namespace_name(n))
    }


def _remove_stale_scratch_namespaces() -> list[str]:
    """Scratch namespaces whose labctl process is gone (a ``kill -9`` during an ebtables diagnosis)."""
    removed = []
    for name in netns.list_all():
        pid = scratch_owner(name)
        if pid is not None and not procs.alive(pid):
            netns.remove(name)
            removed.append(name)
    return removed


def _labs_with_leftovers() -> set[str]:
    """Every lab anything is left of: state, namespaces, relays, or host-wide overrides it holds.

    Only valid lab names are returned: anything else was not made by labctl.
    """
    found = set(state.known_labs()) | _lab_namespaces()
    found |= {lab for lab, _ in relay.find().values()}
    owners = [o for holders in GlobalOverrides.owners().values() for o in holders]
    owners += [o for holders in modules.owners().values() for o in holders]
    found |= {o.partition(":")[2] for o in owners if o.startswith("lab:")}
    return {lab for lab in found if lab_name_problem(lab) is None}


def anything_left_of(lab: str) -> bool:
    """Whether anything of ``lab`` exists: ``down`` of a lab with nothing is an unknown lab (exit 2)."""
    if state.load(lab) is not None or netns.list_labctl(lab) or relay.find(lab):
        return True
    owners = [o for holders in GlobalOverrides.owners().values() for o in holders]
    owners += [o for holders in modules.owners().values() for o in holders]
    return f"lab:{lab}" in owners


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
    for name in sorted([check_lab_name(lab)] if lab is not None else _labs_with_leftovers()):
        try:
            with state.locked(name, wait=2.0):
                _clean_lab(name, done)
        except LabStateError:
            done.busy.append(name)
    # what a dead labctl process left is nobody's to keep, whichever lab was asked for
    done.namespaces += _remove_stale_scratch_namespaces()
    _reclaim_dead_tracers(done)
    if lab is None:
        done.sysctls_restored.update(GlobalOverrides.release_matching(_owner_is_stale))
        state.remove_lock_files(keep=_lab_namespaces() | set(done.busy))
    return done


def reclaim_dead_owners() -> Cleaned:
    """What a killed labctl process left that belongs to no lab: its scratch namespaces and trace instances.

    Cheap (two directory listings) and safe at the start of any command:
    only objects whose owner pid is gone are removed.
    """
    done = Cleaned()
    done.namespaces += _remove_stale_scratch_namespaces()
    _reclaim_dead_tracers(done)
    return done


def _reclaim_dead_tracers(done: Cleaned) -> None:
    """Trace instances and hook-trace rules of tracers whose process is gone.

    Imported here: ``down`` asks this module only whether anything of a lab is left, and the
    tracefs modules cost it 0.01 s of every call.
    """
    from labctl.kernel import tracefs, tracerules

    done.trace_instances = tracefs.remove_stale_instances()
    done.trace_rules = tracerules.reclaim_dead()
