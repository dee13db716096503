"""The registry of expectation kinds: each kind is one class in one file of ``kinds/``.

A kind owns everything about one ``expect`` key of a check:

* ``schema`` -- the pydantic type of its value (the check model is built from the registry);
* ``references`` -- load-time checks against the lab (nodes, captures, bridges exist);
* ``machine`` -- load-time checks against this kernel's facts (drop reasons, counters, tracepoints);
* ``needs`` -- what the observation window must record for it;
* ``judge`` -- the verdict rows, from a recorded :class:`~labctl.evidence.model.Evidence` only.

Judging never touches the kernel, so every kind is tested without root on
recorded evidence (golden files), and a key that is parsed is always judged:
the runner judges every key present, and a kind cannot exist without a judge.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from labctl.errors import KeyPath

if TYPE_CHECKING:
    from labctl.evidence.model import Evidence


@dataclass
class Row:
    """One verdict line: what was expected, what the kernel showed, whether they agree, and why not."""

    what: str
    expected: Any
    observed: Any
    ok: bool
    hint: str = ""
    """On a FAIL: the kernel knob, rule or mechanism to look at."""
    detail: list[str] = field(default_factory=list)
    """On a FAIL: extra lines shown whole (a walk diff marking the first differing step)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "expected": self.expected,
            "observed": self.observed,
            "ok": self.ok,
            "hint": self.hint,
            "detail": self.detail,
        }


@dataclass
class WalkSpec:
    """One node's netfilter walk to record: which bridge tables, and whether nat must run (conntrack)."""

    bridge_tables: set[str] = field(default_factory=set)
    nat: bool = False
    nft: bool = False
    """The node's nft base chains too (steps ``nft:FAMILY:TABLE:CHAIN``)."""
    ip: bool = True
    """The iptables tables (False when every step named is an nft one: tracing them would instantiate them)."""
    ip6: bool = False
    """The ip6tables tables (steps ``ip6:TABLE:CHAIN``)."""


@dataclass
class Needs:
    """What a check's expectations need the window to record, beyond counters (always read)."""

    events: set[str] = field(default_factory=set)
    walks: dict[str, WalkSpec] = field(default_factory=dict)
    fdb: set[str] = field(default_factory=set)
    """'node:bridge' keys whose fdb is read after the traffic."""
    conntrack: bool = False
    routes: set[tuple[str, str]] = field(default_factory=set)
    """(node, destination) pairs looked up (``ip route get``) after the traffic."""
    whole_trace: bool = False
    """Lost trace events spoil the verdict (a count with an upper bound, a walk)."""


@dataclass(frozen=True)
class LabView:
    """What a kind may know of the lab at load time: names only, no kernel."""

    nodes: Mapping[str, frozenset[str]]
    """node -> its interface names."""
    bridges: Mapping[str, frozenset[str]]
    """node -> its bridge names."""
    captures: frozenset[str]
    """The check's capture keys ('node' and 'node:iface')."""
    listeners: int
    """How many listeners the check's setup has."""
    sockets: Mapping[str, str] = field(default_factory=dict)
    """The check's listeners: 'node:port' -> 'udp' or 'tcp'."""
    exec_steps: frozenset[str] = frozenset()
    """Labels of the check's exec traffic steps ('traffic[2]')."""
    step_kinds: frozenset[str] = frozenset()
    """Which kinds of traffic step the check has ('udp', 'tcp', 'exec', ...)."""


@dataclass(frozen=True)
class MachineFacts:
    """What this kernel offers, read once by the lab layer and handed to the kinds (they read nothing)."""

    drop_reasons: frozenset[str]
    tracepoints: frozenset[str]
    """'system:event' names present in tracefs."""
    snmp_counters: frozenset[str]
    """'Proto.Name' of /proc/net/snmp, netstat and snmp6."""
    link_counters: frozenset[str]
    """stats64 names (rx_packets, tx_dropped, ...)."""
    qdisc_counters: frozenset[str]
    ip_tables: Mapping[str, tuple[str, ...]]
    """iptables table -> its built-in chains, as the hook tracer can trace them."""
    bridge_tables: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class JudgeContext:
    """What a judge may know of the check besides the evidence."""

    traffic_protocols: frozenset[int] = frozenset()
    """Ethertypes of the check's own traffic (0x0800 for UDP/ping over IPv4, 0x0806 for an injected ARP)."""


Issue = tuple[KeyPath, str]
"""A load-time problem: the key path *under this expectation's value* and the message."""


class Kind:
    """Base of every expectation kind; subclasses set ``key``, ``schema``, ``doc`` and override ``judge``."""

    key: ClassVar[str]
    schema: ClassVar[Any]
    doc: ClassVar[str] = ""
    order: ClassVar[int] = 100
    """Position in reports (and in the generated model): smaller first."""
    host_wide: ClassVar[bool] = False
    """It judges host-wide evidence (softnet_stat is per CPU, shared by every namespace): a check stating it
    runs while no other lab runs (``labctl run -j``, ``pytest -n``; see labctl/verify/parallel.py)."""

    def references(self, value: Any, lab: LabView) -> list[Issue]:
        return []

    def machine(self, value: Any, facts: MachineFacts) -> list[Issue]:
        return []

    def needs(self, value: Any, needs: Needs) -> None:
        return None

    def judge(self, value: Any, ev: Evidence, ctx: JudgeContext) -> list[Row]:
        raise NotImplementedError


_REGISTRY: dict[str, Kind] = {}
_loaded = False

KIND_MODULES: dict[str, str] = {
    "delivered": "sockets", "queued_bytes": "sockets", "received_from": "sockets", "socket": "socket",
    "dropped": "drops", "drops": "drops",
    "counters": "counters", "softnet_dropped": "counters", "softnet": "counters",
    "captured": "captures", "captured_direction": "captures", "captured_sources": "captures",
    "tap_after_qdisc": "captures",
    "events": "trace", "stages": "trace",
    "ip6tables": "rules", "rules": "rules", "ebtables": "rules", "nft": "nft",
    "send_error": "sender", "reachable": "sender", "tcp": "tcp", "exec": "exec",
    "fdb": "fdb", "route": "route", "neighbours": "neighbours", "hooks": "netfilter", "conntrack": "conntrack",
    "sums": "sums",
}
"""Each ``expect`` key and the module of ``kinds/`` that registers it, in report order (``kinds()``'s).

The check model's ``expect`` keys come from this table, so a lab file imports and compiles only the
kinds its checks use (``kind``): the 16 modules and their schemas cost a check-free command nothing and a
lab with checks a few of them.  tests/test_kinds.py holds the table to the registry.
"""


def register(cls: type[Kind]) -> type[Kind]:
    """Class decorator: one instance of each kind, keyed by its ``expect`` key."""
    if cls.key in _REGISTRY:
        raise RuntimeError(f"two expectation kinds claim the key {cls.key!r}")
    _REGISTRY[cls.key] = cls()
    return cls


def kinds() -> Mapping[str, Kind]:
    """Every kind, by key, in report order (the ``kinds`` package is imported on first use)."""
    global _loaded
    if not _loaded:  # not "registry empty": importing one kind module directly must not hide the others
        _loaded = True
        from labctl.expect import kinds as package

        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


def kind(key: str) -> Kind:
    """The kind of ``expect`` key ``key``, importing only its own module (KIND_MODULES)."""
    if key not in _REGISTRY:
        importlib.import_module(f"labctl.expect.kinds.{KIND_MODULES[key]}")
    return _REGISTRY[key]


def suggest(name: str, known: Sequence[str] | frozenset[str], limit: int = 3) -> str:
    """' (did you mean X, Y?)' for a near-miss name, or ''."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=limit, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""
