"""The words of an iptables rule: errors, tokens, parsed rules and counter rows (pure, no kernel, no libiptc).

Shared by both families of legacy xtables -- ``ip`` (iptables) and ``ip6``
(ip6tables) -- and by ebtables, which reuses the tokenizer, the error with
its caret line and the counter row.  Nothing here imports python-iptables,
so a module that only needs these types stays cheap to import.
"""

from __future__ import annotations

import io
import re
import shlex
from dataclasses import dataclass
from typing import Literal

TABLES = ("raw", "mangle", "nat", "filter", "security")
"""Tables in the order their hooks run at equal hook (raw -300 ... security 50); the same for ip and ip6."""

Family = Literal["ip", "ip6"]
FAMILIES: tuple[Family, ...] = ("ip", "ip6")
"""``ip``: iptables (NFPROTO_IPV4); ``ip6``: ip6tables (NFPROTO_IPV6).  Both are legacy xtables."""

TOOL: dict[str, str] = {"ip": "iptables", "ip6": "ip6tables"}
"""The command-line tool each family's rules are written for (and named in messages)."""

Command = Literal["append", "insert", "policy", "new-chain"]


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
    leading ``!`` (python-iptables' own convention).  ``family`` is ``ip``
    (iptables) or ``ip6`` (ip6tables): the same words, other libiptc handles.
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
    family: Family = "ip"

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


def clean(exc: BaseException) -> str:
    """python-iptables messages carry bytes reprs (b'udp'); drop the b'' noise."""
    return re.sub(r"b'([^']*)'", r"\1", str(exc))
