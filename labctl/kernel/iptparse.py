"""iptables / ip6tables rule lines parsed into :class:`ParsedRule` (pure: no kernel, no libiptc).

Rules are written the way people write them on a command line
(``-t nat -A POSTROUTING -o eth1 -j MASQUERADE``); ip6tables rules use the
same grammar, only the protocol whose match an option implies differs
(``-p icmpv6 --icmpv6-type echo-request`` loads ``icmp6``, ``-p icmp`` is
IPv4's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from labctl.kernel.iptrules import (
    TABLES,
    Command,
    Extension,
    Family,
    Option,
    ParsedRule,
    RuleError,
    Token,
    tokenize,
)

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

_COMMON_IMPLICIT = {
    "tcp": "tcp",
    "6": "tcp",
    "udp": "udp",
    "17": "udp",
    "udplite": "udplite",
    "136": "udplite",
    "sctp": "sctp",
    "132": "sctp",
    "dccp": "dccp",
    "33": "dccp",
}
IMPLICIT_MATCH: dict[str, dict[str, str]] = {
    "ip": {**_COMMON_IMPLICIT, "icmp": "icmp", "1": "icmp"},
    "ip6": {**_COMMON_IMPLICIT, "icmpv6": "icmp6", "ipv6-icmp": "icmp6", "icmp6": "icmp6", "58": "icmp6"},
}
"""Per family, protocols whose match iptables loads implicitly for options such as --dport."""

_POLICIES = ("ACCEPT", "DROP")
_NUMBER = re.compile(r"^-\d")


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
    family: Family = "ip"
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


def parse_rule(text: str, family: Family = "ip") -> ParsedRule:
    """Parse one iptables rule line (no kernel access).

    Understands ``-t``, the commands ``-A``/``-I``/``-P``/``-N``, the generic
    options ``-p -s -d -i -o`` (with ``!``), ``-m`` matches, ``-j``/``-g``
    targets and their ``--options``.  An option belongs to the most recent
    ``-m``/``-j``; before any of them it belongs to the match implied by
    ``-p`` (``-p udp --dport 53``), as in iptables.  Option values are the
    following words up to the next one starting with ``-`` (negative numbers
    excepted).  ``family`` ``ip6`` reads an ip6tables rule (``-p icmpv6``
    implies the ``icmp6`` match).  Errors raise :class:`RuleError` pointing
    at the bad word.
    """
    state = _ParseState(text, tokenize(text), family=family)
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
    name = IMPLICIT_MATCH[state.family].get(protocol.lstrip("!"))
    if name is None or protocol.startswith("!"):
        raise state.fail(
            f"option {token.value} belongs to no match: put -m <match> before it "
            f"(or -p tcp/udp/{'icmpv6' if state.family == 'ip6' else 'icmp'}/sctp for their options)",
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
        family=state.family,
    )


