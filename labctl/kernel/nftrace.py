"""The order of netfilter hooks a packet passes, as an ordered kernel trace.

Claims N1/N5/E5 (PATHS.md) are about *order*: raw before mangle before nat
before filter inside a hook; PREROUTING -> INPUT for local delivery,
PREROUTING -> FORWARD -> POSTROUTING for forwarding, OUTPUT -> POSTROUTING for
local output; ebtables hooks before the iptables ones they wrap.  Counters
cannot show order, so :class:`HookTracer` produces a sequence.

How: for the duration of the trace an ``NFLOG`` rule is inserted at the top
of every built-in chain of the traced tables (and an ebtables ``--nflog``
watcher at the top of every bridge chain), all logging to one nfnetlink_log
group with a prefix naming the table and chain.  nfnetlink_log delivers the
messages to a netlink socket opened inside the node's namespace, with
``NFULNL_CFG_F_SEQ`` giving each message the instance's sequence number -- the
kernel's own count of the order in which the hooks ran.  The rules are
removed again on exit (libiptc keeps the counters of the user's rules across
both table replacements).

Why NFLOG and not the alternatives (checked on this 6.18 kernel):

* ``-j TRACE`` (legacy iptables) reports through the namespace's nf_log
  backend for IPv4, which is ``nf_log_ipv4`` (syslog) by default; the syslog
  logger is silent outside the initial namespace unless the *global*
  ``net.netfilter.nf_log_all_netns=1`` is set, and then every lab's trace
  lands in the shared kernel log.  Writing ``nfnetlink_log`` to the
  namespace's own ``/proc/sys/net/netfilter/nf_log/2`` works without any
  global sysctl (seen: ``TRACE: raw:PREROUTING:policy:2``, ``TRACE:
  filter:FORWARD:rule:1`` on group 0), but TRACE sees legacy xtables only --
  not the ebtables-nft chains -- and only tables that already exist.
* nft ``meta nftrace set 1`` + ``nft monitor trace`` only sees nf_tables
  chains: the ebtables-nft tables, not python-iptables' legacy xtables.
  A node's own nft chains (its ``nftables:``) are traced like the rest: an
  nft ``log group`` rule at the top of each base chain, into the same
  nfnetlink_log group, so nft, iptables and ebtables steps share one order.
* NFLOG needs no sysctl at all: xt_NFLOG/nft ``log group`` call the
  nfnetlink_log logger directly (``nf_log_all_netns`` only gates the syslog
  logger), and nfnetlink_log instances are per namespace.

The nfnetlink_log socket and its messages are :mod:`labctl.kernel.nflog`; the
match words said again for ip6tables and ebtables are :mod:`labctl.kernel.tracematch`.

Side effects and kernel facts to know about (seen on 6.18):

* tracing a table instantiates it in the namespace if it did not exist
  (legacy xtables tables cannot be unregistered from userspace); a bridge
  table that only the tracer created is deleted again;
* an instantiated nat table does *not* switch conntrack on, and without
  conntrack the nat chains never run; ``conntrack=True`` makes the trace's
  own nat rules use conntrack for the duration of the trace;
* bridged IPv4 with ``bridge-nf-call-iptables=1`` runs, in this order:
  bridge nat PREROUTING, ip raw/mangle/nat PREROUTING, bridge filter
  FORWARD, ip mangle/filter FORWARD, bridge nat POSTROUTING, ip
  mangle/nat POSTROUTING;
* ebtables-nft registers bridge filter OUTPUT at priority -200 and nat
  OUTPUT at 100, so filter OUTPUT runs *before* nat OUTPUT (legacy ebtables
  had nat OUTPUT at -100, filter OUTPUT at 200).
"""

from __future__ import annotations

import secrets
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from labctl.kernel import netns, tracerules
from labctl.kernel.nflog import NflogListener, NflogMessage, TraceError, open_listener
from labctl.kernel.tracematch import ebtables_match, ip6_match

__all__ = ["HookStep", "HookTracer", "TraceError", "ebtables_match", "hook_name", "ip6_match"]

HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
"""nf_inet_hooks and nf_br_hooks share these numbers (0..4)."""

IP_CHAINS = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
BRIDGE_CHAINS = {
    "nat": ("PREROUTING", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}
@dataclass(frozen=True)
class HookStep:
    """One table/chain a packet passed, in kernel order.

    ``seq`` is nfnetlink_log's per-group sequence number: steps sort by it.
    ``ifin``/``ifout`` are interface names in the node's namespace (for
    bridged packets seen by iptables through br_netfilter they are the bridge,
    and ``physin``/``physout`` the ports).  ``src``/``dst``/``ip_id`` come from
    the IPv4 header as it was *at that hook*, so NAT rewrites are visible.
    An IPv6 packet (family ``ip6``: ip6tables) has no id: ``flow`` is its
    header's flow label, which forwarding and NAT leave alone.
    """

    family: str
    table: str
    chain: str
    seq: int
    ifin: str | None
    ifout: str | None
    mark: int
    physin: str | None = None
    physout: str | None = None
    src: str | None = None
    dst: str | None = None
    ip_id: int | None = None
    flow: int | None = None

    @property
    def name(self) -> str:
        """``family:table:chain``, e.g. ``ip:nat:PREROUTING``, ``ip6:filter:INPUT``."""
        return f"{self.family}:{self.table}:{self.chain}"


# --------------------------------------------------------------------------
# the tracer


@dataclass
class _Installed:
    ip_rules: list[str] = field(default_factory=list)
    ip6_rules: list[str] = field(default_factory=list)
    bridge_rules: list[str] = field(default_factory=list)
    bridge_tables_before: list[str] = field(default_factory=list)
    nft_rules: int = 0


class HookTracer:
    """Record the netfilter tables/chains packets pass in ``namespace``, in order.

    ::

        with HookTracer(ns, match="-p udp --dport 5000") as tracer:
            send_the_packet()
        steps = tracer.steps()       # [HookStep(family='ip', table='raw', ...), ...]

    ``tables`` are iptables tables (legacy xtables); ``tables6`` the
    ip6tables tables traced (steps ``ip6:TABLE:CHAIN``, none unless given:
    tracing a table instantiates it); ``bridge_tables`` are
    ebtables tables (``"nat"``, ``"filter"``), traced only when given.
    ``nft`` adds the base chains of the namespace's own nf_tables tables
    (steps ``nft:FAMILY:TABLE:CHAIN``).  ``match`` is iptables match syntax
    limiting the trace to the lab's packets (translated for nft and, by
    :func:`ip6_match`, for ip6tables);
    ``bridge_match`` the ebtables equivalent (derived from ``match`` for
    ``-p``, ``-s``, ``-d``, ``--sport``, ``--dport`` when not given).
    """

    def __init__(
        self,
        namespace: str,
        tables: Sequence[str] = ("raw", "mangle", "nat", "filter", "security"),
        match: str = "",
        bridge_tables: Sequence[str] = (),
        bridge_match: str | None = None,
        group: int | None = None,
        conntrack: bool = False,
        nft: bool = False,
        tables6: Sequence[str] = (),
    ) -> None:
        unknown = [t for t in (*tables, *tables6) if t not in IP_CHAINS]
        unknown += [t for t in bridge_tables if t not in BRIDGE_CHAINS]
        if unknown:
            raise ValueError(f"cannot trace tables {unknown}")
        self.namespace = namespace
        self.tables = tuple(tables)
        self.tables6 = tuple(tables6)
        self.bridge_tables = tuple(bridge_tables)
        self.match = match
        # an IPv6-only trace (ip6tables tables, no iptables ones) follows IPv6 frames across bridges too
        bridge_family = "ip6" if tables6 and not tables else "ip"
        self.bridge_match = bridge_match if bridge_match is not None else ebtables_match(match, bridge_family)
        self.group = group
        self.conntrack = conntrack
        self.nft = nft
        self.tag = "lt" + secrets.token_hex(3)
        self._listener: NflogListener | None = None
        self._installed = _Installed()
        self._messages: list[NflogMessage] = []
        self._recorded = False

    def __enter__(self) -> HookTracer:
        self._listener = open_listener(self.namespace, self.group)
        try:
            self._install(self._listener.group)
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._listener is not None:  # the window waited already: what is queued is all there is
                self._messages.extend(self._listener.drain(settle=0))
        finally:
            self._teardown()

    def prefix(self, family: str, table: str, chain: str) -> str:
        return f"{self.tag}|{family}|{table}|{chain}"

    def _install(self, group: int) -> None:
        from labctl.kernel import ebtables, iptables  # python-iptables: imported only when rules are made

        ip_rules = [
            f"-t {table} -I {chain} 1 {self.match}{self._ct_words(table)} -j NFLOG --nflog-group {group} "
            f"--nflog-prefix {self.prefix('ip', table, chain)}"
            for table in self.tables
            for chain in IP_CHAINS[table]
        ]
        match6 = ip6_match(self.match)
        ip6_rules = [
            f"-t {table} -I {chain} 1 {match6}{self._ct_words(table)} -j NFLOG --nflog-group {group} "
            f"--nflog-prefix {self.prefix('ip6', table, chain)}"
            for table in self.tables6
            for chain in IP_CHAINS[table]
        ]
        bridge_rules = [
            f"-t {table} -I {chain} 1 {self.bridge_match} --nflog-group {group} "
            f"--nflog-prefix {self.prefix('bridge', table, chain)} -j CONTINUE"
            for table in self.bridge_tables
            for chain in BRIDGE_CHAINS[table]
        ]
        if bridge_rules:
            self._installed.bridge_tables_before = ebtables.existing_tables(self.namespace)
        # recorded before any rule goes in: a kill -9 from here on leaves rules the next labctl command removes
        tracerules.record(self.namespace, self.tag, bridge_rules, self._installed.bridge_tables_before)
        self._recorded = True
        if bridge_rules:
            ebtables.apply_rules(self.namespace, bridge_rules)
            self._installed.bridge_rules = bridge_rules
        if ip_rules:
            iptables.apply_rules(self.namespace, ip_rules)
            self._installed.ip_rules = ip_rules
        if ip6_rules:
            iptables.apply_rules(self.namespace, ip6_rules, "ip6")
            self._installed.ip6_rules = ip6_rules
        if self.nft:
            from labctl.kernel import nft

            self._installed.nft_rules = nft.install_trace_rules(
                self.namespace, lambda f, t, c: self.prefix("nft", f"{f}:{t}", c), group, self.match
            )

    def _ct_words(self, table: str) -> str:
        """With ``conntrack``, the nat trace rules use conntrack (and so switch it on).

        nat chains run only for packets conntrack has seen as NEW; in a namespace
        where nothing uses conntrack they never run at all (seen on 6.18).  A
        conntrack match that accepts every state turns conntrack on for as long
        as the trace lasts, so the trace shows where nat sits in the order.
        """
        if not self.conntrack or table != "nat":
            return ""
        return " -m conntrack --ctstate NEW,ESTABLISHED,RELATED,INVALID,UNTRACKED"

    def _teardown(self) -> None:
        """Remove the trace rules (and bridge tables only we created), unbind."""
        from labctl.kernel import ebtables, iptables  # python-iptables: imported only when rules are made

        try:
            if self._installed.ip_rules:
                iptables.delete_where(self.namespace, lambda text: f'"{self.tag}|' in text)
                self._installed.ip_rules = []
            if self._installed.ip6_rules:
                iptables.delete_where(self.namespace, lambda text: f'"{self.tag}|' in text, "ip6")
                self._installed.ip6_rules = []
            if self._installed.nft_rules:
                from labctl.kernel import nft

                nft.remove_trace_rules(self.namespace, f"{self.tag}|nft|")
                self._installed.nft_rules = 0
            if self._installed.bridge_rules:
                ebtables.delete_rules(self.namespace, self._installed.bridge_rules)
                self._installed.bridge_rules = []
                self._drop_bridge_tables_we_made()
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        installed = self._installed
        if self._recorded and not (installed.ip_rules or installed.ip6_rules or installed.bridge_rules):
            tracerules.forget(self.tag)
            self._recorded = False

    def _drop_bridge_tables_we_made(self) -> None:
        from labctl.kernel import ebtables  # python-iptables: imported only when rules are made

        rows = ebtables.list_rules(self.namespace)
        for table in self.bridge_tables:
            if table in self._installed.bridge_tables_before:
                continue
            in_use = any(r.table == table and (r.position or r.policy != "ACCEPT") for r in rows)
            if not in_use:
                ebtables.delete_table(self.namespace, table)

    def messages(self) -> list[NflogMessage]:
        """Raw nfnetlink_log messages of this trace, in kernel order."""
        if self._listener is not None:
            self._messages.extend(self._listener.drain())
        return sorted(self._messages, key=lambda m: m.seq if m.seq is not None else -1)

    def steps(self) -> list[HookStep]:
        """The traced hooks, in the order the kernel ran them."""
        names = _interface_names(self.namespace)
        steps = []
        for message in self.messages():
            parts = message.prefix.split("|")
            if len(parts) != 4 or parts[0] != self.tag:
                continue
            steps.append(_step(parts[1], parts[2], parts[3], message, names))
        return steps


def _step(family: str, table: str, chain: str, message: NflogMessage, names: dict[int, str]) -> HookStep:
    src, dst, ip_id = _ipv4_header(message.payload)
    flow = None
    if ip_id is None:
        src, dst, flow = _ipv6_header(message.payload)
    return HookStep(
        family=family,
        table=table,
        chain=chain,
        seq=message.seq if message.seq is not None else -1,
        ifin=names.get(message.indev or 0),
        ifout=names.get(message.outdev or 0),
        mark=message.mark,
        physin=names.get(message.physindev or 0),
        physout=names.get(message.physoutdev or 0),
        src=src,
        dst=dst,
        ip_id=ip_id,
        flow=flow,
    )


def _ipv6_header(payload: bytes) -> tuple[str | None, str | None, int | None]:
    """Source, destination and flow label of an IPv6 header (the packet's mark across hooks and nodes)."""
    if len(payload) < 40 or payload[0] >> 4 != 6:
        return None, None, None
    flow = struct.unpack_from("!I", payload, 0)[0] & 0xFFFFF
    return socket.inet_ntop(socket.AF_INET6, payload[8:24]), socket.inet_ntop(socket.AF_INET6, payload[24:40]), flow


def _ipv4_header(payload: bytes) -> tuple[str | None, str | None, int | None]:
    if len(payload) < 20 or payload[0] >> 4 != 4:
        return None, None, None
    ip_id = struct.unpack_from("!H", payload, 4)[0]
    return socket.inet_ntoa(payload[12:16]), socket.inet_ntoa(payload[16:20]), ip_id


def _interface_names(namespace: str) -> dict[int, str]:
    with netns.entered(namespace):
        return {index: name for index, name in socket.if_nameindex()}


def hook_name(number: int) -> str:
    """Hook number (as in the NFULA_PACKET_HDR) to its chain name."""
    return HOOKS[number] if 0 <= number < len(HOOKS) else str(number)
