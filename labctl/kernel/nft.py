"""nf_tables rulesets of a node, through the official libnftables binding (``pip-nftables``).

libnftables is nft itself as a library: the same parser, the same error
messages, and every command of one buffer sent as **one** netlink batch -- so
``flush ruleset`` followed by the node's ruleset is one atomic transaction, and
a ruleset the kernel refuses leaves the old one in place.

The binding's context opens its netlink socket in the namespace of the thread
that creates it (and uses it), so every context here is created, used and
freed inside :func:`labctl.kernel.netns.entered` -- never in the root namespace.

Rulesets are *checked* in a scratch namespace: a thread that ``unshare``\\ s a
network namespace of its own (gone when the thread ends) loads the ruleset for
real and lists it back.  That catches what only the kernel refuses (a family
or expression it lacks), and the listing is the kernel's canonical text of
the ruleset, which is what a converge compares a node's current ruleset with.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from labctl.kernel import netns

EBTABLES_TABLES = frozenset({("bridge", "filter"), ("bridge", "nat"), ("bridge", "broute")})
"""Tables ebtables-nft owns: a node's ``ebtables:`` rules live there, outside its ``nftables:`` ruleset."""

T = TypeVar("T")


class NftError(RuntimeError):
    """nft refused a command; the message is nft's own, ``line`` the 1-based line of the input it names."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class NftRuleCounter:
    """One nf_tables rule with its counter (``-1`` when the rule has no ``counter`` statement)."""

    family: str
    table: str
    chain: str
    handle: int
    comment: str | None
    packets: int
    bytes: int
    text: str = ""

    @property
    def key(self) -> str:
        """``inet filter input handle 4``: stable while the ruleset is not reloaded."""
        return f"{self.family} {self.table} {self.chain} handle {self.handle}"


def _library() -> Any:
    try:
        import nftables
    except ImportError as exc:  # pragma: no cover - setup.sh installs it
        raise NftError("the nftables Python binding is missing: run ./setup.sh install") from exc
    return nftables


@contextmanager
def context_here(dry_run: bool = False) -> Iterator[Any]:
    """An ``Nftables`` context whose socket lives in the calling thread's namespace (freed on exit)."""
    library = _library()
    try:
        ctx = library.Nftables()
    except OSError as exc:
        raise NftError(f"libnftables.so.1 cannot be loaded ({exc}): install Debian's libnftables1") from exc
    if dry_run:
        # the binding of Debian 12 has no set_dry_run(); the library does (nft -c)
        _lib().nft_ctx_set_dry_run(ctx._Nftables__ctx, True)
    try:
        yield ctx
    finally:
        del ctx


_ERROR_AT = re.compile(r"^/proc/self/fd/\d+:(?P<line>\d+):[\d-]+: ")


def run_here(ctx: Any, commands: str, first_line: int = 1) -> str:
    """Run ``commands`` (one transaction); nft's output, or NftError with nft's own message.

    The text is handed to libnftables as a file (an anonymous memfd), not a
    buffer: nft 1.0.6 names the right line only for file input.  ``first_line``
    is the number of ``commands``' first line in the caller's own text.
    """
    lib = _lib()
    raw = ctx._Nftables__ctx
    fd = os.memfd_create("labctl-nft", os.MFD_CLOEXEC)
    try:
        os.write(fd, commands.encode())
        rc = lib.nft_run_cmd_from_filename(raw, f"/proc/self/fd/{fd}".encode())
    finally:
        os.close(fd)
    output = (lib.nft_ctx_get_output_buffer(raw) or b"").decode(errors="replace")
    error = (lib.nft_ctx_get_error_buffer(raw) or b"").decode(errors="replace")
    if rc != 0:
        lines = [line.rstrip() for line in error.strip("\n").splitlines()] or [f"nft failed (code {rc})"]
        at = _ERROR_AT.match(lines[0])
        line = None
        if at is not None:
            line = int(at["line"]) - 1 + first_line
            lines[0] = lines[0][at.end() :]
        raise NftError("\n".join(lines), line)
    return output


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libnftables.so.1")
    lib.nft_run_cmd_from_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_filename.restype = ctypes.c_int
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    return lib


def in_scratch_namespace(work: Callable[[], T]) -> T:
    """Run ``work`` in a thread inside a fresh, unnamed network namespace (gone when the thread ends)."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            netns.check_call(netns.LIBC.unshare(netns.CLONE_NEWNET), "unshare")
            result.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name="labctl-nft-scratch")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def with_flush(ruleset: str) -> str:
    """The transaction that replaces a whole ruleset: ``flush ruleset`` then the rules."""
    return "flush ruleset\n" + ruleset.rstrip("\n") + "\n"


def canonical(ruleset: str) -> str:
    """Load ``ruleset`` into a scratch namespace and list it back as the kernel holds it.

    NftError with nft's message when nft or the kernel refuses it.  Needs root
    (a namespace of one's own); nothing outside the scratch namespace is touched.
    """

    def work() -> str:
        with context_here() as ctx:
            run_here(ctx, with_flush(ruleset), first_line=0)
            return _listing(ctx, keep=lambda family, table: True)

    return in_scratch_namespace(work)


def check(ruleset: str, base: str | None = None) -> NftError | None:
    """nft's objection to ``ruleset`` (loaded on top of ``base``), or None; in a scratch namespace."""

    def work() -> NftError | None:
        with context_here() as ctx:
            if base is not None:
                run_here(ctx, base)
            try:
                run_here(ctx, ruleset)
            except NftError as exc:
                return exc
            return None

    return in_scratch_namespace(work)


def can_check() -> bool:
    """Whether rulesets can be checked against the kernel here (root, for a scratch namespace)."""
    return os.geteuid() == 0


def _listing(ctx: Any, keep: Callable[[str, str], bool]) -> str:
    """The stateless text listing (no counter values, no handles) of the tables ``keep`` accepts."""
    ctx.set_stateless_output(True)
    ctx.set_handle_output(False)
    try:
        tables = _tables(ctx)
        parts = []
        for family, name in sorted(tables):
            if keep(family, name):
                parts.append(run_here(ctx, f"list table {family} {name}").strip())
        return "\n".join(parts)
    finally:
        ctx.set_stateless_output(False)


def _tables(ctx: Any) -> list[tuple[str, str]]:
    ctx.set_json_output(True)
    try:
        data = json.loads(run_here(ctx, "list tables") or '{"nftables": []}')
    finally:
        ctx.set_json_output(False)
    return [(t["table"]["family"], t["table"]["name"]) for t in data["nftables"] if "table" in t]


_FAMILY_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def tables_here() -> list[tuple[str, str]]:
    """(family, name) of every nf_tables table in the calling thread's namespace: one netlink dump.

    Cheaper than a libnftables context (which reads the whole ruleset into its
    cache); a converge asks it of every node, most of which have no table.
    """
    from labctl.kernel.netlink import NETLINK_NETFILTER, Netlink

    nf_msg_gettable, nfnl_subsys_nftables, nfta_table_name = 1, 10, 1
    sock = Netlink(NETLINK_NETFILTER, dumps_only=True)
    found = []
    try:
        body = struct.pack("=BBH", 0, 0, 0)
        for data in sock.dump_all((nfnl_subsys_nftables << 8) | nf_msg_gettable, body):  # payload at byte 16
            family = data[16]
            attrs = 16 + 4
            name = ""
            while attrs + 4 <= len(data):
                length, kind = struct.unpack_from("=HH", data, attrs)
                if length < 4:
                    break
                if kind & 0x3FFF == nfta_table_name:
                    name = data[attrs + 4 : attrs + length].split(b"\0", 1)[0].decode(errors="replace")
                attrs += (length + 3) & ~3
            found.append((_FAMILY_NAMES.get(family, str(family)), name))
    except OSError:  # no nf_tables in this kernel: then there is no table either
        return []
    finally:
        sock.close()
    return found


def _own(keep_ebtables: bool) -> Callable[[str, str], bool]:
    return lambda family, table: not (keep_ebtables and (family, table) in EBTABLES_TABLES)


def current(namespace: str, keep_ebtables: bool) -> str:
    """The node's ruleset as canonical text (ebtables-nft's tables left out when the node has ebtables)."""
    with netns.entered(namespace), context_here() as ctx:
        return _listing(ctx, _own(keep_ebtables))


def has_tables(namespace: str) -> bool:
    with netns.entered(namespace), context_here() as ctx:
        return bool(_tables(ctx))


def replace(namespace: str, ruleset: str, keep_ebtables: bool) -> None:
    """Replace the node's ruleset in one transaction (ebtables-nft's tables kept when asked)."""
    with netns.entered(namespace), context_here() as ctx:
        if keep_ebtables:
            deletes = [f"delete table {f} {t}" for f, t in _tables(ctx) if _own(True)(f, t)]
            run_here(ctx, "\n".join([*deletes, ruleset.rstrip("\n")]) + "\n")
        else:
            run_here(ctx, with_flush(ruleset), first_line=0)


def remove(namespace: str, keep_ebtables: bool) -> None:
    """Delete the node's own tables (the file no longer has ``nftables:``)."""
    replace(namespace, "", keep_ebtables)


def apply_commands(namespace: str, commands: str) -> None:
    """Run ``commands`` in the node as one transaction (a check's temporary rules)."""
    with netns.entered(namespace), context_here() as ctx:
        run_here(ctx, commands.rstrip("\n") + "\n")


def list_json(namespace: str) -> list[dict[str, Any]]:
    """The node's whole ruleset as libnftables JSON objects (with handles and counters)."""
    return _list_both(namespace)[0]


def _list_both(namespace: str) -> tuple[list[dict[str, Any]], dict[tuple[str, str, str, int], str]]:
    """The ruleset as JSON objects, and each rule's text as nft prints it (by family, table, chain, handle)."""
    with netns.entered(namespace), context_here() as ctx:
        ctx.set_handle_output(True)
        text = run_here(ctx, "list ruleset")
        ctx.set_json_output(True)
        data = json.loads(run_here(ctx, "list ruleset") or '{"nftables": []}')
    return list(data.get("nftables", [])), _rule_texts(text)


_RULE_HANDLE = re.compile(r"^\s*(?P<rule>.*?)\s*# handle (?P<handle>\d+)$")


def _rule_texts(listing: str) -> dict[tuple[str, str, str, int], str]:
    """Rule lines of ``nft -a list ruleset`` keyed by where they are (counter values cut out)."""
    texts: dict[tuple[str, str, str, int], str] = {}
    family = table = chain = ""
    for line in listing.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table":
            family, table = words[1], words[2]
        elif len(words) >= 2 and words[0] == "chain":
            chain = words[1]
        elif (match := _RULE_HANDLE.match(line)) and chain and not line.lstrip().startswith(("type ", "chain ")):
            rule = re.sub(r"counter packets \d+ bytes \d+", "counter", match["rule"])
            texts[(family, table, chain, int(match["handle"]))] = rule
    return texts


def rule_counters(namespace: str) -> list[NftRuleCounter]:
    """Every rule of the node (ebtables-nft's included) with its counter, in listing order."""
    rows = []
    objects, texts = _list_both(namespace)
    for item in objects:
        rule = item.get("rule")
        if rule is None:
            continue
        packets = byte_count = -1
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                packets = int(expr["counter"].get("packets", 0))
                byte_count = int(expr["counter"].get("bytes", 0))
        rows.append(
            NftRuleCounter(
                family=rule["family"],
                table=rule["table"],
                chain=rule["chain"],
                handle=int(rule["handle"]),
                comment=rule.get("comment"),
                packets=packets,
                bytes=byte_count,
                text=texts.get((rule["family"], rule["table"], rule["chain"], int(rule["handle"])), ""),
            )
        )
    return rows


def counts(rows: list[NftRuleCounter], skip: Callable[[NftRuleCounter], bool] = lambda r: False) -> dict[str, int]:
    """``family table chain handle N`` and, for a rule with a comment, the comment -> packets."""
    found: dict[str, int] = {}
    for row in rows:
        if row.packets < 0 or skip(row):
            continue
        found[row.key] = row.packets
        if row.comment:
            found[row.comment] = row.packets
    return found


def base_chains(namespace: str) -> list[tuple[str, str, str]]:
    """(family, table, chain) of every base chain of the node (chains hooked into netfilter)."""
    chains = []
    for item in list_json(namespace):
        chain = item.get("chain")
        if chain is not None and "hook" in chain:
            chains.append((chain["family"], chain["table"], chain["name"]))
    return chains


# --------------------------------------------------------------------------
# the hook walk: a log rule at the top of every base chain (see labctl.kernel.nftrace)


_MATCH_WORDS = {"-s": "ip saddr", "--source": "ip saddr", "-d": "ip daddr", "--destination": "ip daddr"}


def nft_match(match: str) -> str:
    """Translate the tracer's simple iptables match (``-p udp --dport 5000 -d 10.0.0.2``) to nft."""
    words = match.split()
    out: list[str] = []
    proto = ""
    i = 0
    while i + 1 < len(words):
        word, value = words[i], words[i + 1]
        if word in ("-p", "--protocol"):
            proto = value
            out.append(f"meta l4proto {value}")
        elif word in _MATCH_WORDS:
            out.append(f"{_MATCH_WORDS[word]} {value}")
        elif word in ("--dport", "--sport") and proto in ("udp", "tcp"):
            out.append(f"{proto} {word[2:]} {value}")
        else:
            raise ValueError(f"cannot translate {word!r} of {match!r} for nft")
        i += 2
    return " ".join(out)


def install_trace_rules(namespace: str, prefix: Callable[[str, str, str], str], group: int, match: str) -> int:
    """Insert ``log group`` at the top of every base chain of the node's own tables; how many.

    ``prefix(family, table, chain)`` names the step.  nft's ``log group``
    calls nfnetlink_log directly, like iptables' NFLOG, so one listener numbers
    the nft, iptables and ebtables steps in the single order the kernel ran them.
    """
    chains = [c for c in base_chains(namespace) if (c[0], c[1]) not in EBTABLES_TABLES]
    if not chains:
        return 0
    condition = nft_match(match)
    commands = [
        f"insert rule {family} {table} {chain} {condition if family != 'arp' else ''}"
        f' log group {group} prefix "{prefix(family, table, chain)}"'
        for family, table, chain in chains
    ]  # an arp chain sees no IP: its packets are all traced
    apply_commands(namespace, "\n".join(commands))
    return len(chains)


def remove_trace_rules(namespace: str, marker: str) -> None:
    """Delete every rule whose log prefix starts with ``marker`` (one transaction)."""
    deletes = []
    for item in list_json(namespace):
        rule = item.get("rule")
        if rule is None:
            continue
        for expr in rule.get("expr", []):
            log = expr.get("log") if isinstance(expr, dict) else None
            if isinstance(log, dict) and str(log.get("prefix", "")).startswith(marker):
                deletes.append(f"delete rule {rule['family']} {rule['table']} {rule['chain']} handle {rule['handle']}")
    if deletes:
        apply_commands(namespace, "\n".join(deletes))
