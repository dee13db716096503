"""Reading and emptying the iptables / ip6tables tables of a namespace, with rule counters.

Only tables that already exist are read (``/proc/net/ip_tables_names``,
``/proc/net/ip6_tables_names`` of the namespace), so listing never
instantiates a table: opening one with libiptc would (and registers its
hooks).  Rule text is in iptables-save form, produced by the same libxt
``save`` functions iptables-save / ip6tables-save use.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import iptc

from labctl.kernel import netns
from labctl.kernel.iptbuild import LOCK, XtTable, open_handle
from labctl.kernel.iptbuild import close_handle as _close
from labctl.kernel.iptrules import TABLES, Family, RuleCounter, RuleError
from labctl.kernel.iptrules import clean as _clean
from labctl.kernel.xtnames import table_names_here


def existing_tables(namespace: str, family: Family = "ip") -> list[str]:
    """The xtables tables of ``family`` instantiated in ``namespace``, in hook order.

    Reading ``/proc/net/ip_tables_names`` does not create tables; opening one
    with libiptc does (and registers its hooks, e.g. nat turns conntrack on).
    """
    with netns.entered(namespace):
        return existing_tables_here(family)


def existing_tables_here(family: Family = "ip") -> list[str]:
    """:func:`existing_tables` for the namespace the thread is in now."""
    names = table_names_here(family)
    return [t for t in TABLES if t in names]


def list_rules(namespace: str, tables: Sequence[str] | None = None, family: Family = "ip") -> list[RuleCounter]:
    """Every rule and built-in policy of ``namespace`` (``family``'s tables) with packet/byte counters.

    Only tables that already exist are read (see :func:`existing_tables`), so
    listing never instantiates a table.  Rule text is in iptables-save form,
    produced by the same libxt ``save`` functions iptables-save uses.
    """
    wanted = existing_tables(namespace, family)
    if tables is not None:
        wanted = [t for t in wanted if t in tables]
    rows: list[RuleCounter] = []
    with LOCK, netns.entered(namespace):
        for name in wanted:
            table = open_handle(name, family)
            try:
                rows.extend(_table_rows(table))
            finally:
                _close(table)
    return rows


def _table_rows(table: XtTable) -> Iterator[RuleCounter]:
    for chain in table.chains:
        if table.builtin_chain(chain.name):
            policy, (packets, nbytes) = table.get_policy(chain.name)
            yield RuleCounter(
                table.name,
                chain.name,
                0,
                f"-P {chain.name} {policy.name}",
                packets,
                nbytes,
                policy.name,
            )
        for number, rule in enumerate(chain.rules, start=1):
            packets, nbytes = rule.get_counters()
            yield RuleCounter(table.name, chain.name, number, rule_text(chain.name, rule), packets, nbytes)


def rule_text(chain: str, rule: iptc.Rule) -> str:
    """An installed rule in iptables-save syntax (``-A CHAIN ...``)."""
    words = [f"-A {chain}"]
    words += _address_words("-s", rule.src)
    words += _address_words("-d", rule.dst)
    words += _negatable_words("-i", rule.in_interface)
    words += _negatable_words("-o", rule.out_interface)
    protocol = rule.protocol
    if protocol and protocol.lstrip("!") not in ("ip", "0", "all"):
        words += _negatable_words("-p", protocol)
    for match in rule.matches:
        words.append(f"-m {match.name}{_saved(match, rule)}")
    target = rule.target
    if target is not None and target.name:
        jump = "-g" if getattr(target, "_goto", False) else "-j"
        words.append(f"{jump} {target.name}{_saved(target, rule)}")
    return " ".join(w for w in words if w)


def _saved(extension: Any, rule: iptc.Rule) -> str:
    """The extension's options as its libxt ``save`` prints them (" --dport 53")."""
    try:
        buf = extension._get_saved_buf(rule.get_ip())
    except Exception:
        return ""
    if not buf:
        return ""
    text = buf.decode() if isinstance(buf, bytes) else str(buf)
    return " " + text.strip() if text.strip() else ""


def _negatable_words(flag: str, value: str | None) -> list[str]:
    if not value:
        return []
    if value.startswith("!"):
        return [f"! {flag} {value[1:]}"]
    return [f"{flag} {value}"]


def _address_words(flag: str, value: str | None) -> list[str]:
    """``10.0.0.1/255.255.255.255`` -> ``-s 10.0.0.1/32``, ``2001:db8::1/128`` as is; nothing for 0/0 or ::/0."""
    if not value:
        return []
    negated = value.startswith("!")
    address, _, mask = value.lstrip("!").partition("/")
    prefix = _prefix_length(mask) if mask else (128 if ":" in address else 32)
    if prefix == 0 and address in ("0.0.0.0", "::"):
        return []
    return _negatable_words(flag, ("!" if negated else "") + f"{address}/{prefix}")


def _prefix_length(mask: str) -> int:
    if mask.isdigit():
        return int(mask)
    (value,) = struct.unpack("!I", socket.inet_aton(mask))
    return bin(value).count("1")


def flush(namespace: str, family: Family = "ip") -> None:
    """Empty every existing table of ``family`` in ``namespace`` and reset built-in policies.

    For ``down``/tests: leaves tables registered (legacy xtables tables cannot
    be unregistered from userspace) but without rules or user chains.
    """
    with LOCK, netns.entered(namespace):
        for name in existing_tables_here(family):
            table = open_handle(name, family)
            try:
                empty_table(table)
                table.commit()
            finally:
                _close(table)


def empty_table(table: XtTable) -> None:
    """Take every rule and user chain out of an open handle and reset built-in policies (nothing committed)."""
    for chain in table.chains:
        table.flush_entries(chain.name)
    for chain in table.chains:
        if table.builtin_chain(chain.name):
            table.set_policy(chain.name, "ACCEPT")
        else:
            table.delete_chain(chain.name)


def delete_where(namespace: str, predicate: Callable[[str], bool], family: Family = "ip") -> int:
    """Delete every rule of ``family`` whose iptables-save text satisfies ``predicate``.

    One commit per table that changed; returns how many rules went.  Used to
    take temporary rules (e.g. a tracer's NFLOG rules) out again while the
    user's rules keep their counters.
    """
    removed = 0
    with LOCK, netns.entered(namespace):
        for name in existing_tables_here(family):
            table = open_handle(name, family)
            try:
                count = _delete_in_table(table, predicate)
                if count:
                    table.commit()
                removed += count
            except iptc.IPTCError as exc:
                raise RuleError(f"-t {name}", f"cannot delete rules: {_clean(exc)}", namespace) from exc
            finally:
                _close(table)
    return removed


def _delete_in_table(table: XtTable, predicate: Callable[[str], bool]) -> int:
    count = 0
    for chain in table.chains:
        doomed = [number for number, rule in enumerate(chain.rules) if predicate(rule_text(chain.name, rule))]
        for number in reversed(doomed):
            if table._iptc.iptc_delete_num_entry(chain.name.encode(), number, table._handle) != 1:
                raise iptc.IPTCError(f"cannot delete rule {number + 1} of {chain.name}")
        count += len(doomed)
    return count
