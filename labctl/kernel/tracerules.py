"""Trace rules a killed hook tracer left in a lab that stays up, found by a root-owned record and removed.

``HookTracer`` (``nftrace.py``) inserts NFLOG rules at the top of every chain
it traces and removes them on exit.  A ``kill -9`` skips the exit: the rules
stay, shift the user's rule numbers (``filter:INPUT:1`` is then a trace rule)
and log into a group nobody reads.  So before installing, the tracer writes a
record under ``/run/labctl/tracerules`` (pid, start time, namespace, tag, the
bridge rules and the bridge tables that existed); the record goes when the
rules go.  A record whose process is gone (or whose pid was reused: another
start time) is reclaimed by the next labctl command: its rules are deleted by
tag, bridge tables only it created are dropped.  Listing the directory is all
it costs when nothing was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from labctl.errors import LabctlError
from labctl.kernel import netns, procs, registry

RECORDS_DIR = os.path.join(registry.STATE_DIR, "tracerules")


def _name(tag: str) -> str:
    return f"{tag}.json"


def record(namespace: str, tag: str, bridge_rules: list[str], bridge_tables_before: list[str]) -> None:
    """Say, before any rule is inserted, which rules this process is about to put into ``namespace``."""
    pid = os.getpid()
    data = {
        "pid": pid,
        "start": procs.start_time(pid),
        "namespace": namespace,
        "tag": tag,
        "bridge_rules": bridge_rules,
        "bridge_tables_before": bridge_tables_before,
    }
    fd = registry.open_dir(RECORDS_DIR)
    try:
        registry.write_atomically(fd, _name(tag), json.dumps(data))
    finally:
        os.close(fd)


def forget(tag: str) -> None:
    """The rules of ``tag`` are gone: so goes their record."""
    fd = registry.open_dir(RECORDS_DIR)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_name(tag), dir_fd=fd)
    finally:
        os.close(fd)


def _records() -> list[dict[str, Any]]:
    if not os.path.isdir(RECORDS_DIR):
        return []
    fd = registry.open_dir(RECORDS_DIR)
    found = []
    try:
        for name in os.listdir(fd):
            if not name.endswith(".json"):
                continue
            try:
                data = json.loads(registry.read_text(fd, name) or "null")
            except (LabctlError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("tag"), str):
                found.append(data)
    finally:
        os.close(fd)
    return found


def _owner_alive(data: dict[str, Any]) -> bool:
    pid = int(data["pid"])
    return procs.alive(pid) and procs.start_time(pid) == data.get("start")


def reclaim_dead() -> list[str]:
    """Remove the trace rules of tracers that died; returns ``namespace:tag`` for each record reclaimed."""
    reclaimed = []
    for data in _records():
        if _owner_alive(data):
            continue
        namespace, tag = str(data.get("namespace", "")), str(data["tag"])
        if netns.exists(namespace):
            remove(namespace, tag, list(data.get("bridge_rules", [])), list(data.get("bridge_tables_before", [])))
        forget(tag)
        reclaimed.append(f"{namespace}:{tag}")
    return reclaimed


def remove(namespace: str, tag: str, bridge_rules: list[str], bridge_tables_before: list[str]) -> None:
    """Delete the rules of ``tag`` from ``namespace`` (those that are there) and the bridge tables only they needed."""
    from labctl.kernel import ebtables, iptables

    for family in iptables.FAMILIES:  # ip and ip6: a table the tracer never touched costs one /proc read
        iptables.delete_where(namespace, lambda text: f'"{tag}|' in text or f"{tag}|" in text, family)
    if not bridge_rules:
        return
    present = {(r.table, r.rule) for r in ebtables.list_rules(namespace)}
    still = [r for r in bridge_rules if any(tag in rule for _, rule in present)]
    with contextlib.suppress(LabctlError, ebtables.RuleError):
        if still:
            ebtables.delete_rules(namespace, still)
    rows = ebtables.list_rules(namespace)
    for table in {r.table for r in rows} - set(bridge_tables_before):
        if not any(r.table == table and (r.position or r.policy != "ACCEPT") for r in rows):
            ebtables.delete_table(namespace, table)
