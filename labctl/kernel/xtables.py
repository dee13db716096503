"""Which iptables / ip6tables targets and matches this kernel offers, so a rule it lacks is refused before building.

The kernel lists the xtables extensions registered for IPv4 in
``/proc/net/ip_tables_targets`` and ``/proc/net/ip_tables_matches``, for IPv6
in ``/proc/net/ip6_tables_targets`` and ``ip6_tables_matches`` (family-free
``xt_*`` extensions such as NFLOG or udp appear in both): on a monolithic
kernel that is everything built in.  A modular kernel lists only
what is loaded; an extension whose ``CONFIG_`` option is ``m`` is loaded on
demand when the rule is committed, so it counts too (read through
``kconfig``).  Without either source nothing is refused: labctl never claims a
kernel lacks what it cannot see.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable
from dataclasses import dataclass

from labctl.kernel import kconfig

PROC_LISTS = {
    "ip": {"target": "/proc/net/ip_tables_targets", "match": "/proc/net/ip_tables_matches"},
    "ip6": {"target": "/proc/net/ip6_tables_targets", "match": "/proc/net/ip6_tables_matches"},
}
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
"""Verdicts of the standard target: no extension, every kernel with iptables has them."""

ALIASES = {"target": {"NOTRACK": "CT"}, "match": {"state": "conntrack"}}
"""Userspace names whose extension registers in the kernel under another name (libxt's ``real_name``)."""

_CONFIG_PREFIXES = {
    "ip": {
        "target": ("CONFIG_NETFILTER_XT_TARGET_", "CONFIG_IP_NF_TARGET_"),
        "match": ("CONFIG_NETFILTER_XT_MATCH_", "CONFIG_IP_NF_MATCH_"),
    },
    "ip6": {
        "target": ("CONFIG_NETFILTER_XT_TARGET_", "CONFIG_IP6_NF_TARGET_"),
        "match": ("CONFIG_NETFILTER_XT_MATCH_", "CONFIG_IP6_NF_MATCH_"),
    },
}
_MODULE_PREFIXES = {"ip": ("xt_", "ipt_"), "ip6": ("xt_", "ip6t_")}

IP6_BASE = "CONFIG_IP6_NF_IPTABLES"
"""ip6tables itself (ip6_tables.ko): without it no ip6tables rule, counter or walk exists."""
IP6_TABLE_OPTIONS = {
    "filter": "CONFIG_IP6_NF_FILTER",
    "mangle": "CONFIG_IP6_NF_MANGLE",
    "raw": "CONFIG_IP6_NF_RAW",
    "nat": "CONFIG_IP6_NF_NAT",
    "security": "CONFIG_IP6_NF_SECURITY",
}
"""The option that builds each ip6tables table (ip6table_filter.ko ...)."""


def ip6_requirements(tables: Iterable[str]) -> list[str]:
    """Kernel options ip6tables rules in ``tables`` need: ip6tables itself and each table's option."""
    return [IP6_BASE, *(IP6_TABLE_OPTIONS[t] for t in dict.fromkeys(tables) if t in IP6_TABLE_OPTIONS)]


@dataclass(frozen=True)
class Offer:
    """The extensions of one kind (``target`` or ``match``) this kernel has, or may load."""

    kind: str
    listed: frozenset[str]
    loadable: frozenset[str]
    """Upper-cased names whose option is ``m`` (a modular kernel loads them on demand)."""
    known: bool
    """False when neither the kernel's list nor its config could be read: refuse nothing."""

    def has(self, name: str) -> bool:
        if not self.known:
            return True
        names = {name, ALIASES[self.kind].get(name, name)}
        return bool(names & self.listed) or any(n.upper().replace("-", "_") in self.loadable for n in names)

    def suggestion(self, name: str) -> str | None:
        """The closest name this kernel has ('LOGG' -> 'LOG'), case-insensitively."""
        pool = sorted(self.listed | (STANDARD_TARGETS if self.kind == "target" else frozenset()))
        by_upper = {n.upper(): n for n in pool}
        close = difflib.get_close_matches(name.upper(), list(by_upper), n=1, cutoff=0.6)
        return by_upper[close[0]] if close else None


MODULES_DIR = "/lib/modules"


@functools.cache
def _module_names(family: str = "ip") -> frozenset[str]:
    """Upper-cased extension names the installed modules provide (``xt_udp`` is an alias of ``xt_tcpudp``).

    The config names an option, not every extension it builds: CONFIG_NETFILTER_XTABLES builds the tcp and
    udp matches into xt_tcpudp.  modules.alias and modules.dep name them all; a module kernel loads them on
    demand when the rule is committed.  A target and a match may share a name here: this only ever widens
    what counts as present, so nothing the kernel has is refused.
    """
    import os
    import platform

    base = os.path.join(MODULES_DIR, platform.release())
    names: set[str] = set()
    try:
        with open(os.path.join(base, "modules.alias"), encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "alias":
                    names.add(parts[1])
        with open(os.path.join(base, "modules.dep"), encoding="utf-8", errors="replace") as f:
            for line in f:
                module = os.path.basename(line.partition(":")[0])
                names.add(module.split(".ko", 1)[0])
    except OSError:
        return frozenset()
    found = set()
    for name in names:
        for prefix in _MODULE_PREFIXES[family]:
            if name.startswith(prefix) and len(name) > len(prefix):
                found.add(name[len(prefix):].upper().replace("-", "_"))
    return frozenset(found)


@functools.cache
def offer(kind: str, family: str = "ip") -> Offer:
    """What this kernel offers ``family`` (``ip``, ``ip6``) for ``kind`` (``target`` or ``match``); read once."""
    listed: set[str] = set()
    read_list = False
    try:
        with open(PROC_LISTS[family][kind], encoding="ascii", errors="replace") as f:
            listed = {line.strip() for line in f if line.strip()}
            read_list = True
    except OSError:
        pass
    config = kconfig.options()
    loadable: set[str] = set()
    if config is not None and config.get("CONFIG_MODULES") == "y":
        for option, value in config.items():
            for prefix in _CONFIG_PREFIXES[family][kind]:
                if value == "m" and option.startswith(prefix):
                    loadable.add(option[len(prefix) :])
    loadable |= _module_names(family)
    modular_unknown = config is None and read_list and _modules_possible()
    known = (read_list or config is not None) and not modular_unknown
    return Offer(kind, frozenset(listed), frozenset(loadable), known)


def _modules_possible() -> bool:
    """A kernel without its config may still load modules: then a short list proves nothing."""
    import os

    return os.path.exists("/proc/modules")
