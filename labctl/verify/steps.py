"""The check steps that run programs and open connections: ``exec`` (setup and traffic), ``tcp``, the TCP
listener, and per-check interface ``features``.  ``stage.py`` calls them; each records what happened in the
window (an :class:`~labctl.evidence.model.ExecEvidence`, a :class:`~labctl.evidence.model.ConnectionEvidence`)
and a step that could not do what it said is a window error, so the check is an ERROR, never a PASS.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from labctl.evidence.model import ConnectionEvidence, ExecEvidence, SendEvidence, SocketEvidence
from labctl.evidence.window import Window
from labctl.kernel import netns
from labctl.kernel.command import CommandResult, run_in_node
from labctl.kernel.offloads import swap_features
from labctl.kernel.sched import pinned
from labctl.kernel.tcp import TcpListener, connect_tcp
from labctl.topology.checks import Check, Listen
from labctl.topology.model import Topology
from labctl.topology.steps import Exec, SendTcp, SetupExec, exec_label, feature_name, split_endpoint

STORED_OUTPUT = 4096
"""Characters of each stream kept in the evidence, which is what ``stdout``/``stderr`` patterns are judged on."""


def _ns(topo: Topology, node: str) -> str:
    return netns.namespace_name(topo.name, node)


def _evidence(label: str, node: str, result: CommandResult) -> ExecEvidence:
    return ExecEvidence(
        label, node, result.argv, result.exit, result.stdout, result.stderr, result.seconds, result.error
    )


def _stored(run: ExecEvidence) -> ExecEvidence:
    return ExecEvidence(
        run.label, run.node, run.argv, run.exit, run.stdout[:STORED_OUTPUT], run.stderr[:STORED_OUTPUT],
        run.seconds, run.error,
    )


def unmet(step: Exec, run: ExecEvidence) -> list[str]:
    """What of the step's stated outcome the run did not meet (for setup steps, which must succeed)."""
    if run.error:
        return [run.error]
    misses = []
    if step.exit is not None and run.exit != step.exit:
        misses.append(f"exit {run.exit}, not {step.exit}")
    for stream in ("stdout", "stderr"):
        pattern = getattr(step, stream)
        if pattern is not None and not re.search(pattern, getattr(run, stream), re.MULTILINE):
            misses.append(f"{stream} does not match {pattern!r}")
    return misses


def _describe(run: ExecEvidence) -> str:
    said = (run.stderr or run.stdout).strip().splitlines()
    return f"{' '.join(run.argv)} in {run.node}" + (f": {said[-1][:200]}" if said else "")


@contextlib.contextmanager
def setup_execs(topo: Topology, check: Check, record: list[ExecEvidence], errors: list[str]) -> Iterator[None]:
    """Run the setup's exec steps; on exit run the ``undo`` of each that ran, in reverse order.

    A setup step that does not end as it says (exit 0 unless stated) stops the setup: the check is an ERROR
    (``errors``) and its traffic is not sent on a stage that is not in place.
    """
    done: list[tuple[int, SetupExec]] = []
    try:
        for index, step in enumerate(check.setup.exec):
            if errors:  # an earlier part of the stage failed: nothing more is put in place
                break
            label = f"setup.exec[{index}]"
            run = _evidence(label, step.node, run_in_node(_ns(topo, step.node), step.cmd, step.timeout))
            record.append(_stored(run))
            done.append((index, step))
            misses = unmet(step, run)
            if misses:
                errors.append(f"{label} ({_describe(run)}) did not do what it said: {'; '.join(misses)}")
                break
        yield
    finally:
        for index, step in reversed(done):
            if step.undo is None:
                continue
            label = f"undo setup.exec[{index}]"
            run = _evidence(label, step.node, run_in_node(_ns(topo, step.node), step.undo, step.timeout))
            record.append(_stored(run))
            if run.error or run.exit != 0:
                errors.append(f"{label} ({_describe(run)}) failed: {run.error or f'exit {run.exit}'}")


def run_exec(topo: Topology, label: str, step: Exec, window: Window) -> None:
    """A traffic exec step: its program is a lab task (its packets are the lab's); its result is evidence."""
    with window.draining():
        result = run_in_node(_ns(topo, step.node), step.cmd, step.timeout, started=window.add_tasks)
    run = _evidence(label, step.node, result)
    window.record_exec(_stored(run))
    if run.error:
        window.error(f"{label} ({' '.join(step.cmd)} in {step.node}): {run.error}")


@contextlib.contextmanager
def interface_features(topo: Topology, check: Check, errors: list[str]) -> Iterator[None]:
    """ethtool features for the check, each interface put back to its previous values afterwards.

    A feature the device lacks or the driver will not change is a stage error (``errors``): the check is
    an ERROR naming it, and its traffic is not sent.
    """
    done: list[tuple[str, str, dict[str, bool]]] = []
    try:
        for ref, wanted in check.setup.features.items():
            node, _, ifname = ref.partition(":")
            named = {feature_name(k): v for k, v in wanted.items()}
            try:
                before = swap_features(_ns(topo, node), ifname, named, strict=True)
            except OSError as exc:
                errors.append(f"setup.features[{ref}]: {exc}")
                break
            done.append((node, ifname, before))
        yield
    finally:
        for node, ifname, before in reversed(done):
            with contextlib.suppress(OSError):
                swap_features(_ns(topo, node), ifname, before)


def run_tcp(topo: Topology, step: SendTcp, window: Window, errno_stated: bool) -> None:
    """A tcp step.  Refused and timed-out connections are evidence; a connection that could not even be
    attempted (no socket, out of time), or that failed with another errno the check does not state
    (``tcp: {errno: ...}``), means the traffic never left: the check is an ERROR, not a PASS."""
    host, port = split_endpoint(step.to)
    try:
        with window.draining(), pinned(step.cpu):  # the drainer is not pinned with the connects
            attempts = connect_tcp(
                _ns(topo, step.node), host, port, b"x" * step.bytes, count=step.count, timeout=step.timeout
            )
    except OSError as exc:
        window.error(f"tcp from {step.node} to {step.to}: no socket ({exc})")
        window.record_send(SendEvidence(step.node, "tcp", step.count, 0))
        return
    window.record_connections(
        ConnectionEvidence(step.node, step.to, a.outcome, a.errno, a.sent, a.state) for a in attempts
    )
    tried = sum(1 for a in attempts if a.outcome != "not_tried")
    window.record_send(SendEvidence(step.node, "tcp", step.count, tried))
    if tried < step.count:
        window.error(f"tcp from {step.node} to {step.to}: only {tried} of {step.count} connections tried in time")
    failed = sorted({a.errno or "" for a in attempts if a.outcome == "error"})
    if failed and not errno_stated:
        window.error(
            f"tcp from {step.node} to {step.to}: connect failed ({', '.join(failed)}); state tcp: {{errno: ...}}"
            " if that is the claim"
        )


def tcp_listener(topo: Topology, spec: Listen) -> TcpListener:
    return TcpListener(_ns(topo, spec.node), spec.port, addr=spec.address, backlog=spec.backlog, accept=spec.accept)


def tcp_socket_evidence(spec: Listen, listener: TcpListener) -> SocketEvidence:
    if spec.accept:
        listener.wait_idle()
    stats = listener.stats()
    return SocketEvidence(
        node=spec.node,
        port=spec.port,
        received=stats.accepted,
        received_bytes=stats.received_bytes,
        queued_bytes=stats.queued_bytes,
        drops=stats.drops,
        proto="tcp",
        state=stats.state,
        accept_queue=stats.accept_queue,
    )


__all__ = ["exec_label", "interface_features", "run_exec", "run_tcp", "setup_execs", "tcp_listener"]
