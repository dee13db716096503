"""Bring a topology up on the kernel (or converge a running lab to it), and down: the orchestration.

``up`` is a converge: namespaces, interfaces, addresses and routes that
already match are kept, missing ones created, stale ones removed.  Whatever
this run created is rolled back if any step fails, so a failed ``up`` leaves
nothing half-built behind.

Speed comes from doing per node what the kernel needs and no more: every
device in a namespace this run created gets its ifindex chosen in advance (so no
lookups), each node's changes go out as one netlink batch per step, veth
peers are born with their settings, and a converge reads each namespace's
state once.  python-iptables (0.3 s to import) is loaded only when a node
has rules or had tables.

This module orders the steps, records what a run created and undoes it on failure; the steps are
:mod:`labctl.lab.namespaces`, :mod:`labctl.lab.netdevs` (bridges, veths, taps, interface settings),
:mod:`labctl.lab.virtual`, :mod:`labctl.lab.addressing`, :mod:`labctl.lab.tuning` (modules, sysctls,
features, tc), :mod:`labctl.lab.rulesets` and :mod:`labctl.lab.settle`, all on one
:class:`labctl.lab.builder.Builder` (the topology's :class:`labctl.lab.plan.Plan` and the run's state).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labctl.errors import KernelError, LabFileError, Problem
from labctl.kernel import nft, sysctl
from labctl.kernel.sysctl import GlobalOverrides
from labctl.lab import addressing, netdevs, relay, rulesets, settle, state, teardown, tuning
from labctl.lab.builder import Builder
from labctl.lab.namespaces import ipv6_after_converge, namespaces
from labctl.lab.state import LabState
from labctl.lab.teardown import down, owner

if TYPE_CHECKING:  # the model costs 0.1 s to import; down never needs it
    from labctl.topology.model import Topology

__all__ = ["BUILD_STEPS", "down", "owner", "up"]


@dataclass
class _Run:
    """What one ``up`` created, so a failure can undo exactly that."""

    namespaces: list[str] = field(default_factory=list)
    relays: list[int] = field(default_factory=list)
    globals_acquired: bool = False


def up(
    topo: Topology,
    file: str,
    progress: Callable[[str, int, int], None] | None = None,
    changes: list[str] | None = None,
) -> LabState:
    """Build or converge ``topo``; on failure undo what this call created and re-raise.

    ``changes``, when given, receives a line per object this run created,
    replaced, set or removed -- virtual interfaces, bridge settings, links,
    addresses, routes, tc trees and nft rulesets (``up`` prints them; a second
    ``up`` of the same file leaves it empty).

    A lab up from another file is refused (LabFileError, exit 2): its name is
    taken, and converging would silently rebuild someone else's lab.
    ``progress(step, done, total)`` is told as each step starts (the CLI draws it).
    """
    steps = iter(range(BUILD_STEPS))

    def tick(name: str) -> None:
        if progress is not None:
            progress(name, next(steps), BUILD_STEPS)

    with state.locked(topo.name):
        previous = state.load(topo.name)
        if previous is not None and previous.file != os.path.abspath(file):
            raise LabFileError(
                [
                    Problem(
                        ("name",),
                        f"lab {topo.name} is already up from {previous.file}; converging it to this file would"
                        f" change someone else's lab: bring it down first (labctl down {topo.name}) or give"
                        " this file another name",
                        file,
                    )
                ]
            )
        builder = Builder(topo)
        current = LabState(
            name=topo.name,
            file=os.path.abspath(file),
            status="building",
            nodes=dict(builder.ns),
            relays=previous.relays if previous else {},
            digest=state.digest(topo),
            interfaces={node: sorted(names) for node, names in builder.wanted_interfaces.items()},
        )
        state.save(current)  # written first: a kill -9 from here on is still cleanable
        run = _Run()
        try:
            if topo.sysctls or previous is not None:
                # converge, not release-then-acquire: a value kept is never written back and forth
                GlobalOverrides.converge(owner(topo.name), dict(topo.sysctls))
                run.globals_acquired = bool(topo.sysctls)
            tick("namespaces")
            namespaces(builder, run.namespaces)
            netdevs.remove_stale_interfaces(builder)
            tick("bridges")
            netdevs.bridges(builder)
            builder.virtual.masters()
            tick("links")
            netdevs.links(builder)
            builder.commit()
            tick("interfaces")
            builder.virtual.interfaces()
            netdevs.configure(builder)
            tick("addresses and routes")
            addressing.addresses_and_routes(builder)
            builder.commit()
            builder.virtual.bridges()
            tick("sysctls, modules, knobs")
            tuning.kernel_modules(builder)
            tuning.knobs(builder)
            tick("traffic control")
            current.tc = tuning.traffic_control(builder, previous.tc if previous else {})
            tick("netfilter")
            rulesets.netfilter(builder)
            tick("relays")
            current.relays = _relays(builder, run, current.relays)
            tick("waiting for links to come up")
            ipv6_after_converge(builder, settle.settle(builder))
        except BaseException as exc:
            teardown.rollback(run.relays, run.namespaces, topo.name, first_up=previous is None)
            if previous is None:
                state.forget(topo.name)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            undone = (
                "rolled back what this run created"
                if previous is None
                else "the lab is partly converged: run up again, or down"
            )
            detail = (
                str(exc)
                if isinstance(exc, OSError | sysctl.SysctlError | nft.NftError) or _is_rule_error(exc)
                else repr(exc)
            )
            raise KernelError(f"lab {topo.name}: {detail}; {undone}") from exc
        finally:
            builder.close()
            if changes is not None:
                changes.extend(builder.changes)
        current.status = "up"
        state.save(current)
        if changes is not None:
            changes.extend(builder.traffic_changes)
        return current


BUILD_STEPS = 10
"""Steps ``up`` reports to its progress callback."""


def _relays(builder: Builder, run: _Run, previous: dict[str, int]) -> dict[str, int]:
    """Each VM's relay: kept while alive in a namespace this run did not recreate, else started (and
    recorded in ``run`` for a rollback); relays of VMs the lab no longer has are stopped."""
    pids: dict[str, int] = {}
    for vm, pairs in builder.relay_pairs().items():
        old = previous.get(vm)
        if old is not None and relay.alive(old, builder.lab) and vm not in builder.fresh:
            pids[vm] = old
            continue
        if old is not None and relay.alive(old, builder.lab):
            relay.stop([old])  # never a pid the kernel may have given to another process
        pids[vm] = relay.start(builder.lab, vm, pairs)
        run.relays.append(pids[vm])
    stale = [pid for pid, (_, vm) in relay.find(builder.lab).items() if pids.get(vm) != pid]
    relay.stop(stale)
    return pids


def _is_rule_error(exc: BaseException) -> bool:
    """A rule the kernel refused (iptables, ip6tables or ebtables: their one RuleError, loaded with any rule)."""
    rules = sys.modules.get("labctl.kernel.iptrules")
    return rules is not None and isinstance(exc, rules.RuleError)
