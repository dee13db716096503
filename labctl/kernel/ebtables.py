"""ebtables rules of a lab node, applied with ebtables-nft inside its namespace.

There is no Python binding for ebtables, and this kernel has no legacy
ebtables (``CONFIG_BRIDGE_NF_EBTABLES_LEGACY`` is not set), so the rules go
through ``ebtables-nft`` -- which stores them as nf_tables tables ``bridge
filter`` / ``bridge nat``.  ``nft list ruleset`` in the namespace shows them
in nft syntax.

Atomicity.  A node's rules are fed to ``ebtables-nft-restore --noflush`` as
one input; ebtables-nft turns it into a single nf_tables transaction, so the
kernel takes all of it or nothing.  On failure it reports the input line,
which is mapped back to the rule text.

broute.  ebtables-nft 1.8.9 has no broute table ("table 'broute' does not exist"); newer ebtables-nft
emulates it with the nft expression ``meta broute set 1``, which needs ``nft_meta_bridge``
(``CONFIG_NFT_BRIDGE_META``) -- and nft 1.0.6 cannot even express it.  So ``-t broute`` rules go through
**legacy** ebtables (``ebtables-legacy``, shipped by Debian's ``ebtables`` package) where the kernel has
the legacy broute table (``CONFIG_BRIDGE_EBT_BROUTE``: Debian's 6.1 as the ``ebtable_broute`` module); both
kinds of bridge tables hook the same bridge, side by side.  A kernel without it (this machine's 6.18: no
legacy ebtables built at all) refuses such a rule with a RuleError that says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from labctl.kernel import netns, rulesync
from labctl.kernel.broute import LEGACY, broute_available
from labctl.kernel.iptrules import RuleCounter, RuleError, Token, tokenize
from labctl.names import has_control, scratch_namespace_name

EBTABLES = "ebtables-nft"
RESTORE = "ebtables-nft-restore"
SAVE = "ebtables-nft-save"
LEGACY_RESTORE = "ebtables-legacy-restore"

TABLES = ("filter", "nat")
"""The bridge tables ebtables-nft offers (broute goes through legacy ebtables: see the module docstring)."""
LEGACY_TABLES = ("broute",)

BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "OUTPUT", "POSTROUTING"),
    "broute": ("BROUTING",),
}

BROUTE_UNSUPPORTED = (
    "ebtables broute is not available on this machine: this kernel has no legacy broute table "
    "(CONFIG_BRIDGE_EBT_BROUTE) and ebtables-nft 1.8.9 has no broute table (its emulation needs "
    "nft 'meta broute', i.e. nft_meta_bridge / CONFIG_NFT_BRIDGE_META); a check that needs it "
    "says requires: [CONFIG_BRIDGE_EBT_BROUTE]"
)


_COMMANDS = {
    "-A": "append",
    "--append": "append",
    "-I": "insert",
    "--insert": "insert",
    "-D": "delete",
    "--delete": "delete",
    "-P": "policy",
    "--policy": "policy",
    "-N": "new-chain",
    "--new-chain": "new-chain",
}
_POLICIES = ("ACCEPT", "DROP", "CONTINUE", "RETURN")


@dataclass(frozen=True)
class EbRule:
    """An ebtables rule line split into table, command, chain and the rest.

    ``spec`` holds the match/target words exactly as given; ebtables-nft
    parses them.
    """

    text: str
    table: str
    command: str
    chain: str
    position: int | None = None
    policy: str | None = None
    spec: tuple[str, ...] = ()

    def restore_line(self) -> str:
        """The line for ebtables-restore (chain headers are separate)."""
        words = {"append": ["-A", self.chain], "delete": ["-D", self.chain]}.get(self.command)
        if words is None:  # insert
            words = ["-I", self.chain] + ([str(self.position)] if self.position else [])
        return " ".join(words + [_quote(w) for w in self.spec])


def _quote(word: str) -> str:
    """Quote a word for ebtables-restore, which splits lines itself (double quotes)."""
    if word and not re.search(r"[\s\"'\\]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_rule(text: str) -> EbRule:
    """Split an ebtables command line (no kernel access); RuleError points at bad words."""
    if has_control(text):  # ebtables-restore reads lines: a newline would make a second rule
        raise _error(text, "control characters (a newline, a tab, ...) are not allowed in a rule", None)
    tokens = tokenize(text)
    table = "filter"
    command: str | None = None
    chain = ""
    position: int | None = None
    policy: str | None = None
    spec: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.value in ("-t", "--table"):
            table, i = _argument(text, tokens, i), i + 2
            if table not in BUILTIN_CHAINS:
                raise _error(text, f"unknown bridge table {table!r}", tokens[i - 1])
            if table == "broute" and not broute_available():  # refused with the file's line, before building
                raise _error(text, BROUTE_UNSUPPORTED, tokens[i - 1])
            continue
        if token.value in _COMMANDS:
            if command is not None:
                raise _error(text, "only one command per rule", token)
            command = _COMMANDS[token.value]
            chain, i = _argument(text, tokens, i), i + 2
            if command == "insert" and i < len(tokens) and tokens[i].value.isdigit():
                position, i = int(tokens[i].value), i + 1
            elif command == "policy":
                policy, i = _argument(text, tokens, i - 1), i + 1
                if policy not in _POLICIES:
                    raise _error(text, f"a policy is one of {', '.join(_POLICIES)}", tokens[i - 1])
            continue
        spec.append(token.value)
        i += 1
    if command is None:
        raise _error(text, "no command: expected -A, -I, -D, -P or -N", tokens[0] if tokens else None)
    if command in ("policy", "new-chain") and spec:
        raise _error(text, f"{command} takes no match or target", None)
    return EbRule(text, table, command, chain, position, policy, tuple(spec))


def _argument(text: str, tokens: list[Token], i: int) -> str:
    if i + 1 >= len(tokens) or tokens[i + 1].value.startswith("-"):
        raise _error(text, f"{tokens[i].value} needs an argument", tokens[i])
    return tokens[i + 1].value


def _error(text: str, reason: str, token: Token | None) -> RuleError:
    if token is None:
        return RuleError(text, reason)
    return RuleError(text, reason, token=token.value, offset=token.offset)


@dataclass
class _Script:
    """ebtables-restore input, with the rule each line came from."""

    lines: list[str] = field(default_factory=list)
    origin: list[EbRule | None] = field(default_factory=list)

    def add(self, line: str, rule: EbRule | None) -> None:
        self.lines.append(line)
        self.origin.append(rule)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def build_script(rules: Sequence[EbRule]) -> _Script:
    """Group rules per table: chain headers (``-P``/``-N``) first, then rules in order."""
    script = _Script()
    for table in dict.fromkeys(r.table for r in rules):
        mine = [r for r in rules if r.table == table]
        script.add(f"*{table}", None)
        for rule in mine:
            if rule.command == "policy":
                script.add(f":{rule.chain} {rule.policy}", rule)
            elif rule.command == "new-chain":
                script.add(f":{rule.chain} RETURN", rule)
        for rule in mine:
            if rule.command not in ("policy", "new-chain"):
                script.add(rule.restore_line(), rule)
    return script


def _parsed_in(namespace: str, rules: Sequence[str]) -> list[EbRule]:
    """``rules`` parsed; an error names ``namespace``."""
    parsed = []
    for text in rules:
        try:
            parsed.append(parse_rule(text))
        except RuleError as exc:
            raise exc.in_namespace(namespace) from exc
    return parsed


def apply_rules(namespace: str, rules: Sequence[str]) -> None:
    """Install ebtables ``rules`` in ``namespace`` as one nf_tables transaction."""
    parsed = _parsed_in(namespace, rules)
    legacy = [r for r in parsed if r.table in LEGACY_TABLES]
    nft = [r for r in parsed if r.table not in LEGACY_TABLES]
    if nft:
        _restore(namespace, build_script(nft))
    if legacy:
        _restore_legacy(namespace, build_script(legacy))


def replace_rules(namespace: str, rules: Sequence[str]) -> None:
    """Swap ``namespace``'s ebtables rules for ``rules`` in one nf_tables transaction.

    ``ebtables-nft-restore`` without ``--noflush`` empties each table its input names (rules, user chains,
    policies) and fills it again in the same transaction, so no frame ever meets an empty table; tables the
    node has and ``rules`` do not name are listed empty, to be emptied in it too.  Meant for rules already
    accepted in a scratch namespace (:mod:`labctl.kernel.rulesync`).  Legacy broute is emptied and refilled.
    """
    parsed = _parsed_in(namespace, rules)
    nft = [r for r in parsed if r.table not in LEGACY_TABLES]
    script = build_script(nft)
    named = {r.table for r in nft}
    for table in existing_tables(namespace):
        if table in TABLES and table not in named:
            script.add(f"*{table}", None)
    if script.lines:
        result = _run_restore(namespace, script.text(), noflush=False)
        if result.returncode != 0:
            texts = "; ".join(r.text for r in nft)
            raise RuleError(texts, f"ebtables-restore refused the rules: {_message(result.stderr)}", namespace)
    legacy = [r for r in parsed if r.table in LEGACY_TABLES]
    if broute_available():
        netns.run(namespace, [LEGACY, "-t", "broute", "--init-table"], capture_output=True)
    if legacy:
        _restore_legacy(namespace, build_script(legacy))


def _restore_legacy(namespace: str, script: _Script) -> None:
    """Legacy tables (broute) are replaced whole by ebtables-legacy-restore: all of the table's rules or none."""
    result = netns.run(namespace, [LEGACY_RESTORE, "--noflush"], input=script.text(), capture_output=True,
                       text=True)
    if result.returncode != 0:
        texts = "; ".join(r.text for r in script.origin if r is not None)
        raise RuleError(texts, f"ebtables-legacy-restore refused the rules: {_message(result.stderr)}", namespace)


def _restore(namespace: str, script: _Script) -> None:
    result = _run_restore(namespace, script.text())
    if result.returncode == 0:
        return
    message = _message(result.stderr)
    culprit = _find_culprit(namespace, script)
    if culprit is None:
        texts = "; ".join(r.text for r in script.origin if r is not None)
        raise RuleError(texts, f"ebtables-restore refused the batch: {message}", namespace)
    rule, detail = culprit
    raise RuleError(rule.text, f"ebtables-nft refused the rule: {detail}", namespace)


def _run_restore(namespace: str, text: str, noflush: bool = True) -> subprocess.CompletedProcess[str]:
    flags = ["--noflush"] if noflush else []
    return netns.run(namespace, [RESTORE, *flags], input=text, capture_output=True, text=True)


def _message(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith("Try `"))


def _find_culprit(namespace: str, script: _Script) -> tuple[EbRule, str] | None:
    """Replay the batch rule by rule on a copy of the node's bridge tables.

    ebtables-restore's "Error occurred at line" is exact for syntax errors
    but not for what nf_tables refuses at commit (a jump to a missing chain
    is reported one line late or at the end), so the copy -- in a throw-away
    namespace -- finds the first rule that fails on its own.
    """
    state = netns.run(namespace, [SAVE], capture_output=True, text=True).stdout
    scratch = scratch_namespace_name(os.getpid(), threading.get_ident())
    netns.create(scratch)
    try:
        if state.strip() and _run_restore(scratch, state).returncode != 0:
            return None
        for rule in dict.fromkeys(r for r in script.origin if r is not None):
            result = _run_restore(scratch, build_script([rule]).text())
            if result.returncode != 0:
                return rule, _message(result.stderr).split(" Error occurred at line")[0]
    finally:
        netns.remove(scratch)
    return None


def delete_rules(namespace: str, rules: Sequence[str]) -> None:
    """Delete rules given as they were added (``-A``/``-I`` lines), in one transaction."""
    parsed = [parse_rule(text) for text in rules]
    deletes = [
        EbRule(r.text, r.table, "delete", r.chain, spec=r.spec) for r in parsed if r.command in ("append", "insert")
    ]
    legacy = [r for r in deletes if r.table in LEGACY_TABLES]
    if legacy:
        _restore_legacy(namespace, build_script(legacy))
    if len(legacy) < len(deletes):
        _restore(namespace, build_script([r for r in deletes if r.table not in LEGACY_TABLES]))


def existing_tables(namespace: str) -> list[str]:
    """Bridge nf_tables tables present in ``namespace`` (listing creates none)."""
    result = netns.run(namespace, ["nft", "list", "tables", "bridge"], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("table")]


def delete_table(namespace: str, table: str) -> None:
    """Remove a whole bridge table (used to undo a table only a tracer created)."""
    netns.run(namespace, ["nft", "delete", "table", "bridge", table], capture_output=True)


_SAVE_RULE = re.compile(r"^\[(\d+):(\d+)\]\s+-A\s+(\S+)(.*)$")


def list_rules(namespace: str) -> list[RuleCounter]:
    """Every ebtables rule of ``namespace`` with packet/byte counters.

    From ``ebtables-nft-save -c``.  Policy rows (position 0) carry the policy
    but packets/bytes of -1: nf_tables base chains keep no policy counter.
    """
    result = netns.run(namespace, [SAVE, "-c"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuleError("ebtables-save -c", result.stderr.strip(), namespace)
    rows = parse_save(result.stdout)
    if broute_available():
        listed = netns.run(namespace, [LEGACY, "-t", "broute", "-L", "--Lc"], capture_output=True, text=True)
        if listed.returncode == 0:
            rows += parse_legacy_list("broute", listed.stdout)
    return rows


_LEGACY_CHAIN = re.compile(r"^Bridge chain: (\S+), entries: \d+, policy: (\S+)")
_LEGACY_RULE = re.compile(r"^(.*?)\s*, pcnt = (\d+) -- bcnt = (\d+)$")  # "-j DROP , pcnt" / "DROP, pcnt"


def parse_legacy_list(table: str, text: str) -> list[RuleCounter]:
    """Rows from ``ebtables-legacy -t TABLE -L --Lc`` (pure): legacy chains do count their policy."""
    rows: list[RuleCounter] = []
    chain, number = "", 0
    for raw in text.splitlines():
        line = raw.strip()
        if match := _LEGACY_CHAIN.match(line):
            chain, number = match.group(1), 0
            rows.append(RuleCounter(table, chain, 0, f"-P {chain} {match.group(2)}", -1, -1, match.group(2)))
        elif chain and (match := _LEGACY_RULE.match(line)):
            number += 1
            rows.append(RuleCounter(table, chain, number, f"-A {chain} {match.group(1)}", int(match.group(2)),
                                    int(match.group(3))))
    return rows


def parse_save(text: str) -> list[RuleCounter]:
    """Rows from ``ebtables-save -c`` output (pure; see :func:`list_rules`)."""
    rows: list[RuleCounter] = []
    table = ""
    numbers: dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table, numbers = line[1:], {}
        elif line.startswith(":"):
            chain, _, policy = line[1:].partition(" ")
            rows.append(RuleCounter(table, chain, 0, f"-P {chain} {policy}", -1, -1, policy))
        elif match := _SAVE_RULE.match(line):
            packets, nbytes, chain, rest = match.groups()
            numbers[chain] = numbers.get(chain, 0) + 1
            rows.append(RuleCounter(table, chain, numbers[chain], f"-A {chain}{rest}", int(packets), int(nbytes)))
    return rows


def flush(namespace: str) -> None:
    """Delete every bridge table of ``namespace`` (for a converge that replaces them, and tests)."""
    for table in existing_tables(namespace):
        delete_table(namespace, table)
    if broute_available():  # a legacy table cannot be removed: emptied, its policy back to ACCEPT
        netns.run(namespace, [LEGACY, "-t", "broute", "--init-table"], capture_output=True)


def has_tables(namespace: str) -> bool:
    """Whether ``namespace`` holds any bridge table (ebtables-nft's; a legacy broute table counts when listed)."""
    return bool(existing_tables(namespace)) or broute_available()


TOOL = rulesync.RuleTool("ebtables", has_tables, list_rules, apply_rules, replace_rules, flush)
"""ebtables as :func:`labctl.kernel.rulesync.converge` drives it."""


def converge(namespace: str, rules: Sequence[str]) -> str | None:
    """Make ``namespace``'s ebtables rules be ``rules``: ``loaded``, ``replaced``, ``removed`` or None.

    None: they already were, and nothing was touched (counters keep counting).  A rule ebtables-nft
    refuses leaves the node's rules as they were (RuleError names the rule).
    """
    return rulesync.converge(TOOL, namespace, rules)


def run(namespace: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ebtables-nft with ``args`` in ``namespace`` (for what the API lacks)."""
    return netns.run(namespace, [EBTABLES, *args], capture_output=True, text=True)
