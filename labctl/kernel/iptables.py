"""iptables rules of a lab node, applied with python-iptables inside its namespace.

Rules are written the way people write them on a command line
(``-t nat -A POSTROUTING -o eth1 -j MASQUERADE``).  :func:`parse_rule` turns
such a line into a :class:`ParsedRule` without touching the kernel;
:func:`apply_rules` builds python-iptables objects from it and installs a
node's rules as one batch per table.

Backend.  python-iptables drives *libiptc*, i.e. the **legacy xtables**
backend (``setsockopt(IPT_SO_SET_REPLACE)``), not nf_tables.  Inside the node's
namespace ``iptables-legacy -L``/``iptables-legacy-save`` show the rules and
counters; ``iptables`` (the nft variant, the distribution default) shows empty
chains and warns that legacy tables are present.  Both backends can coexist in
one namespace; their hooks simply both run.

Namespaces.  libiptc opens its raw socket in ``iptc_init`` (python-iptables
``Table.refresh``) and keeps it in the handle until ``iptc_free``; the socket
stays in the namespace it was created in.  So every handle here is opened
while the thread is inside :func:`labctl.kernel.netns.entered`, and the kernel
side of a commit lands in that namespace even though the process lives in the
root namespace (tests check the root namespace is unchanged).

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

Kernel modules.  This kernel is monolithic (``CONFIG_MODULES`` is not set):
xt_physdev, xt_mark, nf_nat, xt_NFLOG, br_netfilter ... are built in, there is
no ``/lib/modules`` and nothing to ``modprobe``; a missing extension shows up as
a commit error (``/proc/net/ip_tables_matches`` and ``..._targets`` list what
the kernel knows).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import shlex
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import iptc

from labctl.kernel import netns

TABLES = ("raw", "mangle", "nat", "filter", "security")
"""Tables in the order their hooks run at equal hook (raw -300 ... security 50)."""

Command = Literal["append", "insert", "policy", "new-chain"]

_COMMANDS: dict[str, Command] = {
    "-A": "append",
    "--append": "append",
    "-I": "insert",
    "--insert": "insert",
    "-P": "policy",
    "--policy": "policy",
    "-N": "new-chain",
    "--new-chain": "new-chain",
}

_GENERIC: dict[str, str] = {
    "-p": "protocol",
    "--protocol": "protocol",
    "-s": "source",
    "--source": "source",
    "--src": "source",
    "-d": "destination",
    "--destination": "destination",
    "--dst": "destination",
    "-i": "in_interface",
    "--in-interface": "in_interface",
    "-o": "out_interface",
    "--out-interface": "out_interface",
}

# protocols whose match iptables loads implicitly for options such as --dport
_IMPLICIT_MATCH = {
    "tcp": "tcp",
    "6": "tcp",
    "udp": "udp",
    "17": "udp",
    "udplite": "udplite",
    "136": "udplite",
    "icmp": "icmp",
    "1": "icmp",
    "sctp": "sctp",
    "132": "sctp",
    "dccp": "dccp",
    "33": "dccp",
}

_POLICIES = ("ACCEPT", "DROP")
_NUMBER = re.compile(r"^-\d")


class RuleError(RuntimeError):
    """A rule could not be parsed or was refused by the library or the kernel.

    ``rule`` is the rule text as given, ``namespace`` where it was applied (None
    for a pure parse), ``token``/``offset`` the offending word and its
    character offset in ``rule`` when one word is to blame.
    """

    def __init__(
        self,
        rule: str,
        reason: str,
        namespace: str | None = None,
        token: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.rule = rule
        self.reason = reason
        self.namespace = namespace
        self.token = token
        self.offset = offset
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        text = f"{self.reason}: rule {self.rule!r}{where}"
        if self.token is not None and self.offset is not None:
            # a caret line under the bad word, aligned with the quoted rule
            pad = " " * (len(f"{self.reason}: rule '") + self.offset)
            text += f"\n{pad}{'^' * max(1, len(self.token))}"
        return text

    def in_namespace(self, namespace: str) -> RuleError:
        """The same error, now naming the namespace it happened in."""
        return RuleError(self.rule, self.reason, namespace, self.token, self.offset)


@dataclass(frozen=True)
class Token:
    """One shell word of a rule and where it starts in the rule text."""

    value: str
    offset: int
    index: int


@dataclass(frozen=True)
class Option:
    """``[!] --name [values...]`` belonging to a match or target."""

    name: str
    values: tuple[str, ...]
    inverted: bool
    token: Token


@dataclass(frozen=True)
class Extension:
    """A match (``-m name``) or target (``-j name``) with its options.

    ``implicit`` marks the protocol match iptables loads by itself for
    ``-p udp --dport 5000``; ``goto`` marks ``-g`` instead of ``-j``.
    """

    name: str
    options: tuple[Option, ...]
    token: Token | None
    implicit: bool = False
    goto: bool = False


@dataclass(frozen=True)
class ParsedRule:
    """A rule line, split into what python-iptables needs to build it.

    Addresses, interfaces and the protocol keep iptables' ``!`` negation as a
    leading ``!`` (python-iptables' own convention).
    """

    text: str
    table: str
    command: Command
    chain: str
    position: int | None = None
    policy: str | None = None
    protocol: str | None = None
    source: str | None = None
    destination: str | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    matches: tuple[Extension, ...] = ()
    target: Extension | None = None

    def error(self, reason: str, token: Token | None = None) -> RuleError:
        """A RuleError for this rule, pointing at ``token`` when given."""
        if token is None:
            return RuleError(self.text, reason)
        return RuleError(self.text, reason, token=token.value, offset=token.offset)


@dataclass(frozen=True)
class RuleCounter:
    """One row of :func:`list_rules`: a rule (or a built-in chain's policy).

    ``position`` is iptables' 1-based rule number; policy rows have position 0,
    ``policy`` set and the chain's policy counters (packets that fell off the
    end of the chain).  ebtables policy rows carry -1 counters: nf_tables base
    chains keep none.
    """

    table: str
    chain: str
    position: int
    rule: str
    packets: int
    bytes: int
    policy: str | None = None


# --------------------------------------------------------------------------
# parsing (pure)


def tokenize(text: str) -> list[Token]:
    """Split ``text`` like a shell and remember where each word starts."""
    stream = io.StringIO(text)
    lexer = shlex.shlex(stream, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens: list[Token] = []
    while True:
        before = stream.tell()
        try:
            value = lexer.get_token()
        except ValueError as exc:  # unbalanced quotes
            raise RuleError(text, f"cannot split rule: {exc}") from exc
        if value is None or value == lexer.eof:
            return tokens
        start = before
        while start < len(text) and text[start].isspace():
            start += 1
        tokens.append(Token(value, start, len(tokens)))


@dataclass
class _ExtensionBuilder:
    name: str
    token: Token | None
    implicit: bool = False
    goto: bool = False
    options: list[Option] = field(default_factory=list)

    def freeze(self) -> Extension:
        return Extension(self.name, tuple(self.options), self.token, self.implicit, self.goto)


@dataclass
class _ParseState:
    text: str
    tokens: list[Token]
    pos: int = 0
    table: str = "filter"
    command: Command | None = None
    chain: str | None = None
    position: int | None = None
    policy: str | None = None
    generic: dict[str, str] = field(default_factory=dict)
    matches: list[_ExtensionBuilder] = field(default_factory=list)
    target: _ExtensionBuilder | None = None
    context: _ExtensionBuilder | None = None
    negation: Token | None = None

    def fail(self, reason: str, token: Token | None) -> RuleError:
        if token is None:
            return RuleError(self.text, reason)
        return RuleError(self.text, reason, token=token.value, offset=token.offset)

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def argument(self, option: Token) -> Token:
        """The word after ``option``; an error if there is none or it is an option."""
        nxt = self.peek()
        if nxt is None or (nxt.value.startswith("-") and not _NUMBER.match(nxt.value)):
            raise self.fail(f"{option.value} needs an argument", option)
        return self.take()


def parse_rule(text: str) -> ParsedRule:
    """Parse one iptables rule line (no kernel access).

    Understands ``-t``, the commands ``-A``/``-I``/``-P``/``-N``, the generic
    options ``-p -s -d -i -o`` (with ``!``), ``-m`` matches, ``-j``/``-g``
    targets and their ``--options``.  An option belongs to the most recent
    ``-m``/``-j``; before any of them it belongs to the match implied by
    ``-p`` (``-p udp --dport 53``), as in iptables.  Option values are the
    following words up to the next one starting with ``-`` (negative numbers
    excepted).  Errors raise :class:`RuleError` pointing at the bad word.
    """
    state = _ParseState(text, tokenize(text))
    if not state.tokens:
        raise RuleError(text, "empty rule")
    while state.peek() is not None:
        _parse_word(state)
    if state.negation is not None:
        raise state.fail("'!' is not followed by anything it could negate", state.negation)
    return _finish(state)


def _parse_word(state: _ParseState) -> None:
    token = state.take()
    word = token.value
    if word == "!":
        if state.negation is not None:
            raise state.fail("double '!'", token)
        state.negation = token
    elif word in ("-t", "--table"):
        _parse_table(state, token)
    elif word in _COMMANDS:
        _parse_command(state, token)
    elif word in _GENERIC:
        _parse_generic(state, token)
    elif word in ("-m", "--match"):
        _parse_match(state, token)
    elif word in ("-j", "--jump", "-g", "--goto"):
        _parse_target(state, token)
    elif word.startswith("--"):
        _parse_option(state, token)
    else:
        raise state.fail(f"unexpected word {word!r}", token)


def _no_negation(state: _ParseState, what: Token) -> None:
    if state.negation is not None:
        raise state.fail(f"'!' cannot negate {what.value}", state.negation)


def _parse_table(state: _ParseState, token: Token) -> None:
    _no_negation(state, token)
    name = state.argument(token)
    if name.value not in TABLES:
        raise state.fail(f"unknown table {name.value!r} (known: {', '.join(TABLES)})", name)
    state.table = name.value


def _parse_command(state: _ParseState, token: Token) -> None:
    _no_negation(state, token)
    if state.command is not None:
        raise state.fail("only one command (-A/-I/-P/-N) per rule", token)
    command = _COMMANDS[token.value]
    state.command = command
    state.chain = state.argument(token).value
    if command == "insert":
        nxt = state.peek()
        if nxt is not None and nxt.value.isdigit():
            state.take()
            if int(nxt.value) < 1:
                raise state.fail("rule numbers start at 1", nxt)
            state.position = int(nxt.value)
    elif command == "policy":
        target = state.argument(token)
        if target.value not in _POLICIES:
            raise state.fail(f"a policy is one of {', '.join(_POLICIES)}", target)
        state.policy = target.value


def _parse_generic(state: _ParseState, token: Token) -> None:
    key = _GENERIC[token.value]
    if key in state.generic:
        raise state.fail(f"{token.value} given twice", token)
    negated = state.negation is not None
    state.negation = None
    value = state.argument(token)
    if value.value == "!":  # old syntax: -s ! 10.0.0.1
        negated = True
        value = state.argument(token)
    state.generic[key] = ("!" if negated else "") + value.value
    state.context = None  # like iptables: a later --opt goes to the implied match


def _parse_match(state: _ParseState, token: Token) -> None:
    _no_negation(state, token)
    name = state.argument(token)
    if state.target is not None:
        raise state.fail("matches must come before the target (-j)", token)
    for existing in state.matches:
        if existing.name == name.value and existing.implicit:
            state.context = existing  # "-p udp --dport 1 -m udp" is one match
            return
    builder = _ExtensionBuilder(name.value, name)
    state.matches.append(builder)
    state.context = builder


def _parse_target(state: _ParseState, token: Token) -> None:
    _no_negation(state, token)
    if state.target is not None:
        raise state.fail("only one target per rule", token)
    name = state.argument(token)
    state.target = _ExtensionBuilder(name.value, name, goto=token.value in ("-g", "--goto"))
    state.context = state.target


def _parse_option(state: _ParseState, token: Token) -> None:
    inverted = state.negation is not None
    state.negation = None
    context = state.context or _implicit_match(state, token)
    values: list[str] = []
    while (nxt := state.peek()) is not None:
        if nxt.value == "!":
            # old syntax "--dport ! 53" negates this option; a '!' after values
            # or before another option ("--mark 7 ! --dport 53") is the next one's
            after = state.tokens[nxt.index + 1] if nxt.index + 1 < len(state.tokens) else None
            if values or after is None or after.value.startswith("-"):
                break
            state.take()
            inverted = True
            continue
        if nxt.value.startswith("-") and not _NUMBER.match(nxt.value):
            break
        values.append(state.take().value)
    name = token.value[2:]
    if not name:
        raise state.fail("empty option name", token)
    context.options.append(Option(name, tuple(values), inverted, token))


def _implicit_match(state: _ParseState, token: Token) -> _ExtensionBuilder:
    """The protocol match that ``-p`` implies, created on first use."""
    protocol = state.generic.get("protocol", "")
    name = _IMPLICIT_MATCH.get(protocol.lstrip("!"))
    if name is None or protocol.startswith("!"):
        raise state.fail(
            f"option {token.value} belongs to no match: put -m <match> before it "
            "(or -p tcp/udp/icmp/sctp for their options)",
            token,
        )
    for existing in state.matches:
        if existing.name == name:
            state.context = existing
            return existing
    builder = _ExtensionBuilder(name, None, implicit=True)
    state.matches.append(builder)
    state.context = builder
    return builder


def _finish(state: _ParseState) -> ParsedRule:
    if state.command is None or state.chain is None:
        raise state.fail("no command: expected -A, -I, -P or -N", state.tokens[0])
    if state.command in ("policy", "new-chain"):
        extra = state.generic or state.matches or state.target
        if extra:
            raise state.fail(f"{state.command} takes no match or target", state.tokens[-1])
    return ParsedRule(
        text=state.text,
        table=state.table,
        command=state.command,
        chain=state.chain,
        position=state.position,
        policy=state.policy,
        protocol=state.generic.get("protocol"),
        source=state.generic.get("source"),
        destination=state.generic.get("destination"),
        in_interface=state.generic.get("in_interface"),
        out_interface=state.generic.get("out_interface"),
        matches=tuple(m.freeze() for m in state.matches),
        target=state.target.freeze() if state.target else None,
    )


# --------------------------------------------------------------------------
# building python-iptables objects (userspace only)

_LOCK = threading.RLock()
"""libiptc/python-iptables state is process-global: one user at a time."""

_NO_SUCH_OPTION = ("no such parameter", "invalid parameter")


class _ChainOracle:
    """Stands in for a table when a rule is built without the kernel.

    python-iptables decides whether ``-j NAME`` is a jump to a user chain by
    asking ``rule.tables`` -- by default *every* table of the process-wide
    cache, which opens (and so instantiates in the kernel) all five legacy
    tables in whatever namespace the thread is in.  Without a table at hand a
    name that is no loadable target extension is taken for a chain; staging
    against the real table then checks that the chain exists.
    """

    def is_chain(self, name: str) -> bool:
        return name not in iptc.Target.STANDARD_TARGETS and not _is_extension(name)


def _is_extension(name: str) -> bool:
    """Whether libxtables can load a target extension called ``name`` (userspace only)."""
    from iptc.xtables import NFPROTO_IPV4, xtables

    return bool(xtables(NFPROTO_IPV4).find_target(name))


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


class _Rule(iptc.Rule):
    """An ``iptc.Rule`` that looks up chains only in the tables we hand it
    (never python-iptables' global table cache) and uses the udata-safe
    match/target classes."""

    def __init__(self, entry: Any = None, chain: Any = None, tables: Sequence[Any] = ()) -> None:
        self._own_tables = list(tables)  # set first: decoding an entry asks for it
        super().__init__(entry, chain)

    @property
    def tables(self) -> list[Any]:
        return self._own_tables

    def create_match(self, name: str, revision: int | None = None) -> _Match:
        match = _Match(self, name=name, revision=revision)
        self.add_match(match)
        return match

    def create_target(self, name: str, revision: int | None = None, goto: bool = False) -> _Target:
        target = _Target(self, name=name, revision=revision, goto=goto)
        self.target = target
        return target


class _Table(iptc.Table):
    """A private libiptc handle of one table in the thread's current namespace.

    Bypasses ``iptc.Table``'s process-wide cache (which would hand out a handle
    bound to whatever namespace first asked), never autocommits, and makes the
    rules it decodes look up chains in this handle only.
    """

    def __new__(cls, name: str) -> _Table:
        return object.__new__(cls)

    def __init__(self, name: str) -> None:
        self._init(name, False)

    def create_rule(self, entry: Any = None, chain: Any = None) -> _Rule:
        return _Rule(entry, chain, tables=[self])


def build_rule(parsed: ParsedRule, table: Any = None) -> iptc.Rule:
    """An ``iptc.Rule`` for an append/insert rule; RuleError names the bad word.

    With ``table`` None only userspace is used (libxt_*.so extension libraries),
    and a ``-j NAME`` that is no extension is assumed to be a user chain.
    """
    if parsed.command not in ("append", "insert"):
        raise parsed.error(f"{parsed.command} is not a rule")
    with _LOCK:
        rule = _Rule(tables=[table if table is not None else _ChainOracle()])
        _set_generic(rule, parsed)
        for match in parsed.matches:
            _add_match(rule, parsed, match)
        _set_target(rule, parsed)
        return rule


def _set_generic(rule: iptc.Rule, parsed: ParsedRule) -> None:
    fields = (
        ("protocol", parsed.protocol),
        ("src", parsed.source),
        ("dst", parsed.destination),
        ("in_interface", parsed.in_interface),
        ("out_interface", parsed.out_interface),
    )
    for attr, value in fields:
        if value is None:
            continue
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
    name = _IMPLICIT_MATCH.get((parsed.protocol or "").lstrip("!"))
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


# --------------------------------------------------------------------------
# tables (kernel)


def _open_table(name: str) -> _Table:
    """A private handle of table ``name`` in the namespace the thread is in now."""
    try:
        return _Table(name)
    except iptc.IPTCError as exc:
        raise RuleError(f"-t {name}", f"cannot open table {name}: {_clean(exc)}") from exc


def _close(table: _Table) -> None:
    """Free a handle without committing what it holds (autocommit is off)."""
    with contextlib.suppress(Exception):
        table.close()


def existing_tables(namespace: str) -> list[str]:
    """The xtables tables instantiated in ``namespace``, in hook order.

    Reading ``/proc/net/ip_tables_names`` does not create tables; opening one
    with libiptc does (and registers its hooks, e.g. nat turns conntrack on).
    """
    with netns.entered(namespace):
        return existing_tables_here()


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
    handle: _Table | None = None
    undo: list[_Undo] = field(default_factory=list)


def apply_rules(namespace: str, rules: Sequence[str]) -> None:
    """Install ``rules`` in ``namespace``: all of them or none.

    All rules are parsed and built first; then each table's operations go
    into a private libiptc handle and every table is committed once
    (``IPT_SO_SET_REPLACE`` swaps the whole table atomically).  If the kernel
    refuses a table, the tables committed before it are put back by undoing
    exactly what was added, so no rule of the batch remains.  A kernel refusal
    does not say which rule is bad; the batch is then replayed rule by rule
    in a throw-away namespace to name it.
    """
    parsed = [_parse_in(namespace, text) for text in rules]
    for rule in parsed:
        if rule.command in ("append", "insert"):
            try:
                build_rule(rule)
            except RuleError as exc:
                raise exc.in_namespace(namespace) from exc
    batches = _group_by_table(parsed)
    with _LOCK, netns.entered(namespace):
        try:
            for batch in batches:
                _stage(batch, namespace)
            _commit_all(batches, namespace)
        finally:
            for batch in batches:
                if batch.handle is not None:
                    _close(batch.handle)


def _parse_in(namespace: str, text: str) -> ParsedRule:
    try:
        return parse_rule(text)
    except RuleError as exc:
        raise exc.in_namespace(namespace) from exc


def _group_by_table(parsed: list[ParsedRule]) -> list[_TableBatch]:
    batches: dict[str, _TableBatch] = {}
    for rule in parsed:
        batches.setdefault(rule.table, _TableBatch(rule.table, [])).rules.append(rule)
    return list(batches.values())


def _stage(batch: _TableBatch, namespace: str) -> None:
    """Apply a table's operations to a fresh handle (userspace only)."""
    batch.handle = _open_table(batch.name)
    for rule in batch.rules:
        try:
            batch.undo.append(_stage_one(batch.handle, rule))
        except RuleError as exc:
            raise exc.in_namespace(namespace) from exc
        except Exception as exc:
            raise RuleError(rule.text, _clean(exc), namespace) from exc


def _stage_one(table: _Table, rule: ParsedRule) -> _Undo:
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


def _chain_length(table: _Table, chain: str) -> int:
    count = 0
    entry = table.first_rule(chain)
    while entry:
        count += 1
        entry = table.next_rule(entry)
    return count


def _commit_all(batches: list[_TableBatch], namespace: str) -> None:
    committed: list[_TableBatch] = []
    for batch in batches:
        assert batch.handle is not None
        try:
            batch.handle.commit()
        except iptc.IPTCError as exc:
            for done in reversed(committed):
                _undo(done)
            raise _blame(batch, namespace, _clean(exc)) from exc
        committed.append(batch)


def _undo(batch: _TableBatch) -> None:
    """Take a committed batch back out, newest operation first."""
    table = _open_table(batch.name)
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
    scratch = netns.namespace_name(f"iptdiag{os.getpid()}", f"{threading.get_ident()}")
    netns.create(scratch)
    try:
        with netns.entered(scratch):
            return _replay(batch, chains)
    finally:
        netns.remove(scratch)


def _replay(batch: _TableBatch, chains: list[str]) -> tuple[ParsedRule, str] | None:
    created = {r.chain for r in batch.rules if r.command == "new-chain"}
    table = _open_table(batch.name)
    try:
        for name in chains:
            if name not in created:
                table.create_chain(name)
        table.commit()
    finally:
        _close(table)
    for rule in batch.rules:
        table = _open_table(batch.name)
        try:
            _stage_one(table, rule)
            table.commit()
        except Exception as exc:
            return rule, _clean(exc)
        finally:
            _close(table)
    return None


# --------------------------------------------------------------------------
# listing (kernel)


def list_rules(namespace: str, tables: Sequence[str] | None = None) -> list[RuleCounter]:
    """Every rule and built-in policy of ``namespace`` with packet/byte counters.

    Only tables that already exist are read (see :func:`existing_tables`), so
    listing never instantiates a table.  Rule text is in iptables-save form,
    produced by the same libxt ``save`` functions iptables-save uses.
    """
    wanted = existing_tables(namespace)
    if tables is not None:
        wanted = [t for t in wanted if t in tables]
    rows: list[RuleCounter] = []
    with _LOCK, netns.entered(namespace):
        for name in wanted:
            table = _open_table(name)
            try:
                rows.extend(_table_rows(table))
            finally:
                _close(table)
    return rows


def _table_rows(table: _Table) -> Iterator[RuleCounter]:
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
    if protocol and protocol not in ("ip", "0", "all"):
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
    """``10.0.0.1/255.255.255.255`` -> ``-s 10.0.0.1/32``; nothing for 0/0."""
    if not value:
        return []
    negated = value.startswith("!")
    address, _, mask = value.lstrip("!").partition("/")
    prefix = _prefix_length(mask) if mask else 32
    if prefix == 0 and address == "0.0.0.0":
        return []
    return _negatable_words(flag, ("!" if negated else "") + f"{address}/{prefix}")


def _prefix_length(mask: str) -> int:
    if mask.isdigit():
        return int(mask)
    (value,) = struct.unpack("!I", socket.inet_aton(mask))
    return bin(value).count("1")


def flush(namespace: str) -> None:
    """Empty every existing table of ``namespace`` and reset built-in policies.

    For ``down``/tests: leaves tables registered (legacy xtables tables cannot
    be unregistered from userspace) but without rules or user chains.
    """
    with _LOCK, netns.entered(namespace):
        for name in existing_tables_here():
            table = _open_table(name)
            try:
                for chain in table.chains:
                    table.flush_entries(chain.name)
                for chain in table.chains:
                    if table.builtin_chain(chain.name):
                        table.set_policy(chain.name, "ACCEPT")
                    else:
                        table.delete_chain(chain.name)
                table.commit()
            finally:
                _close(table)


def delete_where(namespace: str, predicate: Callable[[str], bool]) -> int:
    """Delete every rule whose iptables-save text satisfies ``predicate``.

    One commit per table that changed; returns how many rules went.  Used to
    take temporary rules (e.g. a tracer's NFLOG rules) out again while the
    user's rules keep their counters.
    """
    removed = 0
    with _LOCK, netns.entered(namespace):
        for name in existing_tables_here():
            table = _open_table(name)
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


def _delete_in_table(table: _Table, predicate: Callable[[str], bool]) -> int:
    count = 0
    for chain in table.chains:
        doomed = [number for number, rule in enumerate(chain.rules) if predicate(rule_text(chain.name, rule))]
        for number in reversed(doomed):
            if table._iptc.iptc_delete_num_entry(chain.name.encode(), number, table._handle) != 1:
                raise iptc.IPTCError(f"cannot delete rule {number + 1} of {chain.name}")
        count += len(doomed)
    return count


def _clean(exc: BaseException) -> str:
    """python-iptables messages carry bytes reprs (b'udp'); drop the b'' noise."""
    return re.sub(r"b'([^']*)'", r"\1", str(exc))


def existing_tables_here() -> list[str]:
    """:func:`existing_tables` for the namespace the thread is in now."""
    try:
        with open("/proc/net/ip_tables_names") as f:
            names = set(f.read().split())
    except FileNotFoundError:
        return []
    return [t for t in TABLES if t in names]
