"""Installing iptables / ip6tables rules in a namespace: all of them or none.

All rules are parsed and built first; then each table's operations go into a
private libiptc handle and every table is committed once
(``IPT_SO_SET_REPLACE`` / ``IP6T_SO_SET_REPLACE`` swaps the whole table
atomically).  A table the kernel refuses puts the tables committed before it
back; the culprit is named by replaying the batch in a scratch namespace.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import iptc

from labctl.kernel import netns
from labctl.kernel.iptbuild import LOCK, XtTable, build_rule, open_handle
from labctl.kernel.iptbuild import close_handle as _close
from labctl.kernel.iptlist import empty_table, existing_tables_here
from labctl.kernel.iptparse import parse_rule
from labctl.kernel.iptrules import Family, ParsedRule, RuleError
from labctl.kernel.iptrules import clean as _clean
from labctl.names import scratch_namespace_name


@dataclass
class _Undo:
    """How to take one applied operation back out of a committed table."""

    kind: Literal["delete-rule", "policy", "delete-chain"]
    chain: str
    number: int = 0
    policy: str = ""


@dataclass
class _TableBatch:
    """The operations of one table, built in a handle but not yet committed."""

    name: str
    rules: list[ParsedRule]
    family: Family = "ip"
    handle: XtTable | None = None
    undo: list[_Undo] = field(default_factory=list)


def apply_rules(namespace: str, rules: Sequence[str], family: Family = "ip") -> None:
    """Install ``rules`` (of ``family``: ``ip`` iptables, ``ip6`` ip6tables) in ``namespace``: all or none.

    All rules are parsed and built first; then each table's operations go
    into a private libiptc handle and every table is committed once
    (``IPT_SO_SET_REPLACE`` swaps the whole table atomically).  If the kernel
    refuses a table, the tables committed before it are put back by undoing
    exactly what was added, so no rule of the batch remains.  A kernel refusal
    does not say which rule is bad; the batch is then replayed rule by rule
    in a throw-away namespace to name it.
    """
    batches = _group_by_table(_checked(namespace, rules, family))
    with LOCK, netns.entered(namespace):
        try:
            for batch in batches:
                _stage(batch, namespace)
            _commit_all(batches, namespace)
        finally:
            for batch in batches:
                if batch.handle is not None:
                    _close(batch.handle)


def replace_rules(namespace: str, rules: Sequence[str], family: Family = "ip") -> None:
    """Swap ``namespace``'s ``family`` rules for ``rules``, one table at a time, each in one step.

    Each table the namespace has or the rules name is emptied and refilled in one private handle and
    committed once: ``IPT_SO_SET_REPLACE`` swaps the table whole, so no packet ever meets it empty (a
    flush followed by :func:`apply_rules` would open the firewall in between).  Meant for rules already
    accepted by this kernel in a scratch namespace (:mod:`labctl.kernel.rulesync`): should a table still be
    refused, the tables committed before it keep their new rules and the error names the rule.
    """
    batches = _group_by_table(_checked(namespace, rules, family))
    with LOCK, netns.entered(namespace):
        named = {batch.name for batch in batches}
        batches += [_TableBatch(name, [], family) for name in existing_tables_here(family) if name not in named]
        try:
            for batch in batches:
                _stage(batch, namespace, emptied=True)
            _commit_all(batches, namespace, undo=False)
        finally:
            for batch in batches:
                if batch.handle is not None:
                    _close(batch.handle)


def _checked(namespace: str, rules: Sequence[str], family: Family) -> list[ParsedRule]:
    """Every rule parsed and built once (nothing touches the kernel yet); RuleError names the first bad one."""
    parsed = [_parse_in(namespace, text, family) for text in rules]
    for rule in parsed:
        if rule.command in ("append", "insert"):
            try:
                build_rule(rule)
            except RuleError as exc:
                raise exc.in_namespace(namespace) from exc
    return parsed


def _parse_in(namespace: str, text: str, family: Family) -> ParsedRule:
    try:
        return parse_rule(text, family)
    except RuleError as exc:
        raise exc.in_namespace(namespace) from exc


def _group_by_table(parsed: list[ParsedRule]) -> list[_TableBatch]:
    batches: dict[str, _TableBatch] = {}
    for rule in parsed:
        batches.setdefault(rule.table, _TableBatch(rule.table, [], rule.family)).rules.append(rule)
    return list(batches.values())


def _stage(batch: _TableBatch, namespace: str, emptied: bool = False) -> None:
    """Apply a table's operations to a fresh handle (userspace only), ``emptied`` of its rules first."""
    batch.handle = open_handle(batch.name, batch.family)
    if emptied:
        empty_table(batch.handle)
    for rule in batch.rules:
        try:
            batch.undo.append(_stage_one(batch.handle, rule))
        except RuleError as exc:
            raise exc.in_namespace(namespace) from exc
        except Exception as exc:
            raise RuleError(rule.text, _clean(exc), namespace) from exc


def _stage_one(table: XtTable, rule: ParsedRule) -> _Undo:
    if rule.command == "new-chain":
        table.create_chain(rule.chain)
        return _Undo("delete-chain", rule.chain)
    if not table.is_chain(rule.chain):
        raise rule.error(f"no chain {rule.chain} in table {rule.table}")
    chain = iptc.Chain(table, rule.chain)
    if rule.command == "policy":
        if not table.builtin_chain(rule.chain):
            raise rule.error(f"{rule.chain} is not a built-in chain: it has no policy")
        old, _ = table.get_policy(rule.chain)
        table.set_policy(rule.chain, rule.policy)
        return _Undo("policy", rule.chain, policy=old.name)
    built = build_rule(rule, table)
    if rule.command == "append":
        number = _chain_length(table, rule.chain)
        chain.append_rule(built)
    else:
        number = (rule.position or 1) - 1
        if number > _chain_length(table, rule.chain):
            raise rule.error(f"{rule.chain} has fewer than {number} rules")
        chain.insert_rule(built, number)
    return _Undo("delete-rule", rule.chain, number=number)


def _chain_length(table: XtTable, chain: str) -> int:
    count = 0
    entry = table.first_rule(chain)
    while entry:
        count += 1
        entry = table.next_rule(entry)
    return count


def _commit_all(batches: list[_TableBatch], namespace: str, undo: bool = True) -> None:
    """Commit each table; a refusal takes the tables committed before it back out (``undo``) and names the rule."""
    committed: list[_TableBatch] = []
    for batch in batches:
        assert batch.handle is not None
        try:
            batch.handle.commit()
        except iptc.IPTCError as exc:
            for done in reversed(committed if undo else []):
                _undo(done)
            raise _blame(batch, namespace, _clean(exc)) from exc
        committed.append(batch)


def _undo(batch: _TableBatch) -> None:
    """Take a committed batch back out, newest operation first."""
    table = open_handle(batch.name, batch.family)
    try:
        for step in reversed(batch.undo):
            if step.kind == "delete-rule":
                ok = table._iptc.iptc_delete_num_entry(step.chain.encode(), step.number, table._handle)
                if ok != 1:
                    raise iptc.IPTCError(f"cannot delete rule {step.number} of {step.chain}")
            elif step.kind == "policy":
                table.set_policy(step.chain, step.policy)
            else:
                table.delete_chain(step.chain)
        table.commit()
    finally:
        _close(table)


def _blame(batch: _TableBatch, namespace: str, reason: str) -> RuleError:
    """Name the rule the kernel refused by replaying the batch in a scratch namespace."""
    culprit = _replay_for_culprit(batch)
    if culprit is None:
        texts = "; ".join(r.text for r in batch.rules)
        return RuleError(texts, f"kernel refused table {batch.name}: {reason}", namespace)
    rule, detail = culprit
    return RuleError(rule.text, f"kernel refused the rule: {detail}", namespace)


def _replay_for_culprit(batch: _TableBatch) -> tuple[ParsedRule, str] | None:
    """Commit the batch one rule at a time in an empty namespace; first failure wins.

    The scratch namespace holds the same user chains as the lab's table, so a
    jump to an existing chain is not mistaken for the error.
    """
    chains = []
    if batch.handle is not None:
        chains = [c.name for c in batch.handle.chains if not batch.handle.builtin_chain(c.name)]
    scratch = scratch_namespace_name(os.getpid(), threading.get_ident())  # reclaimed by clean if we die
    netns.create(scratch)
    try:
        with netns.entered(scratch):
            return _replay(batch, chains)
    finally:
        netns.remove(scratch)


def _replay(batch: _TableBatch, chains: list[str]) -> tuple[ParsedRule, str] | None:
    created = {r.chain for r in batch.rules if r.command == "new-chain"}
    table = open_handle(batch.name, batch.family)
    try:
        for name in chains:
            if name not in created:
                table.create_chain(name)
        table.commit()
    finally:
        _close(table)
    for rule in batch.rules:
        table = open_handle(batch.name, batch.family)
        try:
            _stage_one(table, rule)
            table.commit()
        except Exception as exc:
            return rule, _clean(exc)
        finally:
            _close(table)
    return None


