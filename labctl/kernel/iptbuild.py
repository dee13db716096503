"""python-iptables objects for parsed rules: private libiptc handles, rules built in userspace.

Both families: ``ip`` rules become ``iptc.Rule`` in ``iptc.Table`` handles
(libip4tc), ``ip6`` rules ``iptc.Rule6`` in ``iptc.Table6`` handles
(libip6tc); matches and targets are the same libxtables extensions loaded
for NFPROTO_IPV4 or NFPROTO_IPV6.

python-iptables caches one ``Table`` object per table name for the whole
process, which would mix namespaces.  Worse, ``iptc.Target`` asks
``Rule.tables`` -- i.e. ``iptc.Table(name)`` for *all five* tables through that
cache -- whether a target name is a user chain, for every target not in its
short STANDARD_TARGETS list (NFLOG, TRACE, CT, chain jumps ...): building such
a rule instantiates every legacy table in whatever namespace the thread is in
(seen: it did so in the root namespace, where legacy tables cannot be removed
again).  So we open private, uncached handles, give rules only those (or an
offline oracle), never use ``autocommit``, and serialise all libiptc use with
one lock (the library also redirects fd 1 briefly while it formats options).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Sequence
from typing import Any

import iptc

from labctl.kernel.iptparse import IMPLICIT_MATCH
from labctl.kernel.iptrules import Extension, Family, Option, ParsedRule, RuleError
from labctl.kernel.iptrules import clean as _clean

LOCK = threading.RLock()
"""libiptc/python-iptables state is process-global: one user at a time."""

_NO_SUCH_OPTION = ("no such parameter", "invalid parameter")


class _ChainOracle:
    """Stands in for a table of ``family`` when a rule is built without the kernel.

    python-iptables decides whether ``-j NAME`` is a jump to a user chain by
    asking ``rule.tables`` -- by default *every* table of the process-wide
    cache, which opens (and so instantiates in the kernel) all five legacy
    tables in whatever namespace the thread is in.  Without a table at hand a
    name that is no loadable target extension is taken for a chain; staging
    against the real table then checks that the chain exists.
    """

    def __init__(self, family: Family = "ip") -> None:
        self.family = family

    def is_chain(self, name: str) -> bool:
        return name not in iptc.Target.STANDARD_TARGETS and not _is_extension(name, self.family)


def _is_extension(name: str, family: Family = "ip") -> bool:
    """Whether libxtables can load a target extension called ``name`` for ``family`` (userspace only)."""
    from iptc.xtables import NFPROTO_IPV4, NFPROTO_IPV6, xtables

    prepare_family(family)
    return bool(xtables(NFPROTO_IPV6 if family == "ip6" else NFPROTO_IPV4).find_target(name))


def load_match_for_family(name: str, family: Family) -> None:
    """Make libxtables know match ``name`` for ``family``, even if its library was loaded for the other one.

    One ``libxt_*.so`` serves both families (``libxt_MASQUERADE.so`` is a link
    to ``libxt_NAT.so``).  Its constructor registers only the variants of the
    family current when it is first dlopen'ed; a second dlopen of the same file
    runs no constructor, and calling the constructor again exits the process
    ("already registered").  So once a lab's ip6tables rules used MASQUERADE,
    every later IPv4 MASQUERADE in the process was "can't find target" (and the
    other way round; python-iptables issues #112, #316, #325).  The way out is
    a private copy of the library -- an anonymous memfd, a separate instance
    with its own structs -- dlopen'ed with ``family`` current.

    Targets must be loaded so *before* the first lookup of their name for the
    family: libxtables remembers a failed target lookup ("notargets") and
    never looks again, so every target library (``libxt_[A-Z]*``) is loaded for
    a family on its first use here (:func:`prepare_family`).  A match lookup is
    not remembered, so a match is loaded for the family when it is missing.
    """
    prepare_family(family)
    from iptc import xtables as xt

    proto = xt.NFPROTO_IPV6 if family == "ip6" else xt.NFPROTO_IPV4
    if xt.xtables(proto).find_match(name) or not xt._xtables_libdir:
        return
    prefix = "libip6t_" if family == "ip6" else "libipt_"
    for candidate in (f"libxt_{name}.so", f"{prefix}{name}.so"):
        if _load_copy(os.path.join(xt._xtables_libdir, candidate), proto):
            return


def prepare_family(family: Family) -> None:
    """Load every target library for ``family`` as a private copy, once per process (see load_match_for_family)."""
    if family in _PREPARED:
        return
    _PREPARED.add(family)
    from iptc import xtables as xt

    if not xt._xtables_libdir or not os.path.isdir(xt._xtables_libdir):
        return
    proto = xt.NFPROTO_IPV6 if family == "ip6" else xt.NFPROTO_IPV4
    for entry in sorted(os.listdir(xt._xtables_libdir)):
        if entry.startswith("libxt_") and entry[6:7].isupper() and entry.endswith(".so"):
            _load_copy(os.path.join(xt._xtables_libdir, entry), proto)


def _load_copy(path: str, proto: int) -> bool:
    """dlopen a private copy of ``path`` with ``proto`` current, so its constructor registers that family."""
    from iptc import xtables as xt

    real = os.path.realpath(path)
    if not os.path.isfile(real) or (proto, real) in _COPIES:
        return False
    _COPIES.add((proto, real))
    with open(real, "rb") as original:
        image = original.read()
    fd = os.memfd_create(f"labctl-{proto}-{os.path.basename(real)}")  # close-on-exec
    try:
        os.write(fd, image)
        xt.xtables._xtables_set_nfproto(proto)
        # the fd stays open: the loader knows a library by its path, and a
        # reused /proc/self/fd/N would be taken for the copy loaded before
        _LIBRARY_COPIES.append(ctypes.CDLL(f"/proc/self/fd/{fd}"))  # the constructor runs here
    except OSError:
        os.close(fd)
        return False
    return True


_PREPARED: set[str] = set()
"""The families whose target libraries are loaded (as private copies) in this process."""
_COPIES: set[tuple[int, str]] = set()
"""(protocol, library) pairs loaded as a private copy."""
_LIBRARY_COPIES: list[ctypes.CDLL] = []
"""The copies stay loaded for the life of the process: libxtables keeps pointers into them."""


class _UdataKeeper:
    """Keeps an extension's ``udata`` scratch buffer alive (python-iptables 1.2.0 bug).

    ``Match.reset``/``Target.reset`` allocate the per-extension scratch space
    (``udata_size`` > 0, e.g. NFLOG on iptables 1.8.9) in a local ctypes array
    and store its address in the shared extension struct; the array is freed
    when ``reset`` returns and the next option parse writes into freed heap
    (seen: SIGSEGV / "free(): invalid pointer" a little later, under valgrind
    "invalid write ... block free'd by PyCData_dealloc").  Here the buffer
    belongs to the match/target object and is re-pointed before every call
    that hands ``udata`` to libxtables, since the extension struct is shared.
    """

    _module: Any
    _udata_buf: Any

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        size = getattr(self._module, "udata_size", 0)
        self._udata_buf = (ctypes.c_ubyte * size)() if size > 0 else None
        self._point_udata()

    def _point_udata(self) -> None:
        if self._udata_buf is not None:
            self._module.udata = ctypes.cast(ctypes.byref(self._udata_buf), ctypes.c_void_p)

    def _parse(self, argv: Any, inv: Any, entry: Any) -> None:
        self._point_udata()
        super()._parse(argv, inv, entry)  # type: ignore[misc]

    def _final_check(self) -> None:
        self._point_udata()
        super()._final_check()  # type: ignore[misc]


class _Match(_UdataKeeper, iptc.Match):
    pass


class _Target(_UdataKeeper, iptc.Target):
    pass


class _OwnTables:
    """Makes an ``iptc.Rule``/``Rule6`` look up chains only in the tables we hand it
    (never python-iptables' global table cache) and use the udata-safe
    match/target classes."""

    def __init__(self, entry: Any = None, chain: Any = None, tables: Sequence[Any] = ()) -> None:
        self._own_tables = list(tables)  # set first: decoding an entry asks for it
        super().__init__(entry, chain)  # type: ignore[call-arg]

    @property
    def tables(self) -> list[Any]:
        return self._own_tables

    def create_match(self, name: str, revision: int | None = None) -> _Match:
        match = _Match(self, name=name, revision=revision)
        self.add_match(match)  # type: ignore[attr-defined]
        return match

    def create_target(self, name: str, revision: int | None = None, goto: bool = False) -> _Target:
        target = _Target(self, name=name, revision=revision, goto=goto)
        self.target = target
        return target


class _Rule(_OwnTables, iptc.Rule):
    """An IPv4 rule (``ipt_entry``)."""


class _Rule6(_OwnTables, iptc.Rule6):
    """An IPv6 rule (``ip6t_entry``)."""


class _Table(iptc.Table):
    """A private libiptc handle of one table in the thread's current namespace.

    Bypasses ``iptc.Table``'s process-wide cache (which would hand out a handle
    bound to whatever namespace first asked), never autocommits, and makes the
    rules it decodes look up chains in this handle only.
    """

    family: Family = "ip"

    def __new__(cls, name: str) -> _Table:
        return object.__new__(cls)

    def __init__(self, name: str) -> None:
        self._init(name, False)

    def create_rule(self, entry: Any = None, chain: Any = None) -> _Rule:
        return _Rule(entry, chain, tables=[self])


class _Table6(iptc.Table6):
    """:class:`_Table` for ip6tables (libip6tc)."""

    family: Family = "ip6"

    def __new__(cls, name: str) -> _Table6:
        return object.__new__(cls)

    def __init__(self, name: str) -> None:
        self._init(name, False)

    def create_rule(self, entry: Any = None, chain: Any = None) -> _Rule6:
        return _Rule6(entry, chain, tables=[self])


XtTable = _Table | _Table6
"""A private handle of either family."""

_PROTOCOL_ALIASES = {"ip6": {"ipv6-icmp": "icmpv6", "icmp6": "icmpv6"}}
"""ip6tables spellings python-iptables' protocol table lacks, to the one it knows."""


def open_handle(name: str, family: Family = "ip") -> XtTable:
    """A private handle of table ``name`` of ``family`` in the namespace the thread is in now."""
    prepare_family(family)  # listing its rules looks their targets up
    try:
        return _Table6(name) if family == "ip6" else _Table(name)
    except iptc.IPTCError as exc:
        tool = "ip6tables" if family == "ip6" else "iptables"
        raise RuleError(f"-t {name}", f"cannot open {tool} table {name}: {_clean(exc)}") from exc


def close_handle(table: XtTable) -> None:
    """Free a handle without committing what it holds (autocommit is off)."""
    with contextlib.suppress(Exception):
        table.close()


def build_rule(parsed: ParsedRule, table: Any = None) -> iptc.Rule:
    """An ``iptc.Rule`` for an append/insert rule; RuleError names the bad word.

    With ``table`` None only userspace is used (libxt_*.so extension libraries),
    and a ``-j NAME`` that is no extension is assumed to be a user chain.
    """
    if parsed.command not in ("append", "insert"):
        raise parsed.error(f"{parsed.command} is not a rule")
    with LOCK:
        _reclaim_exit_handler()
        prepare_family(parsed.family)
        for match in parsed.matches:
            load_match_for_family(match.name, parsed.family)
        tables = [table if table is not None else _ChainOracle(parsed.family)]
        rule: iptc.Rule = _Rule6(tables=tables) if parsed.family == "ip6" else _Rule(tables=tables)
        _set_generic(rule, parsed)
        for match in parsed.matches:
            _add_match(rule, parsed, match)
        _set_target(rule, parsed)
        return rule


def _reclaim_exit_handler() -> None:
    """Point libxtables' one global ``xt_params`` back at python-iptables' before options are parsed.

    A bad option value (``--dport x``) makes libxtables call ``xt_params->exit_err``: python-iptables'
    raises, but libnftables (the nft code, in the same process) sets its own on init, which prints
    ``nft v1.0.6: Port "x" does not resolve`` and calls exit(2) -- the whole process gone, no rollback.
    """
    from iptc import xtables as xt

    xt._lib_xtables.xtables_set_params(ctypes.byref(xt._xt_globals))


def _set_generic(rule: iptc.Rule, parsed: ParsedRule) -> None:
    fields = (
        ("protocol", parsed.protocol),
        ("src", parsed.source),
        ("dst", parsed.destination),
        ("in_interface", parsed.in_interface),
        ("out_interface", parsed.out_interface),
    )
    aliases = _PROTOCOL_ALIASES.get(parsed.family, {})
    for attr, value in fields:
        if value is None:
            continue
        if attr == "protocol":
            bare = value.lstrip("!")
            value = value[: len(value) - len(bare)] + aliases.get(bare.lower(), bare)
        try:
            setattr(rule, attr, value)
        except Exception as exc:  # python-iptables raises ValueError/IPTCError/socket.error
            raise parsed.error(f"bad value {value!r}: {_clean(exc)}") from exc


def _option_value(option: Option) -> str | list[str]:
    """python-iptables' value convention: '!' prefix or leading '!' element."""
    if len(option.values) <= 1:
        value = option.values[0] if option.values else ""
        return ("!" if option.inverted else "") + value
    return (["!"] if option.inverted else []) + list(option.values)


def _add_match(rule: iptc.Rule, parsed: ParsedRule, match: Extension) -> None:
    try:
        created = rule.create_match(match.name)
    except Exception as exc:
        raise parsed.error(f"unknown match {match.name!r}: {_clean(exc)}", match.token) from exc
    for option in match.options:
        try:
            created.parse(option.name, _option_value(option))
        except Exception as exc:
            if not _fallback_to_protocol(rule, parsed, match, option, exc):
                raise parsed.error(f"match {match.name} refused --{option.name}: {_clean(exc)}", option.token) from exc


def _fallback_to_protocol(
    rule: iptc.Rule, parsed: ParsedRule, match: Extension, option: Option, exc: Exception
) -> bool:
    """iptables gives an option the current match does not know to the -p match.

    ``-p udp -m mark --mark 7 --dport 53`` is legal iptables: ``--dport`` is
    unknown to ``mark`` and goes to the implicit ``udp`` match.
    """
    if not any(text in str(exc) for text in _NO_SUCH_OPTION):
        return False
    name = IMPLICIT_MATCH[parsed.family].get((parsed.protocol or "").lstrip("!"))
    if name is None or name == match.name or (parsed.protocol or "").startswith("!"):
        return False
    existing = [m for m in rule.matches if m.name == name]
    target = existing[0] if existing else rule.create_match(name)
    try:
        target.parse(option.name, _option_value(option))
    except Exception:
        return False
    return True


def _set_target(rule: iptc.Rule, parsed: ParsedRule) -> None:
    spec = parsed.target
    if spec is None:
        rule.create_target("")  # a counting rule: no verdict, falls through
        return
    try:
        target = rule.create_target(spec.name, goto=spec.goto)
    except Exception as exc:
        raise parsed.error(f"unknown target {spec.name!r}: {_clean(exc)}", spec.token) from exc
    for option in spec.options:
        try:
            target.parse(option.name, _option_value(option))
        except Exception as exc:
            raise parsed.error(f"target {spec.name} refused --{option.name}: {_clean(exc)}", option.token) from exc


