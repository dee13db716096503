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

pyroute2 0.9.7 has no nfnetlink_log (NFULNL) message class, so the few
structures needed are packed and parsed here with :mod:`struct`.

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

import errno
import os
import secrets
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from labctl.kernel import netns, tracerules

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

# config attributes / commands (linux/netfilter/nfnetlink_log.h)
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x1

# packet attributes
NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_SEQ = 12

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
COPY_RANGE = 64
"""Bytes of each packet copied into the trace: the IPv4 + transport headers."""


class TraceError(RuntimeError):
    """The trace could not be set up (netlink refused, rules refused)."""


@dataclass(frozen=True)
class NflogMessage:
    """One nfnetlink_log packet message, decoded."""

    family: int
    hook: int
    prefix: str
    seq: int | None
    indev: int | None
    outdev: int | None
    physindev: int | None
    physoutdev: int | None
    mark: int
    timestamp: float | None
    payload: bytes


@dataclass(frozen=True)
class HookStep:
    """One table/chain a packet passed, in kernel order.

    ``seq`` is nfnetlink_log's per-group sequence number: steps sort by it.
    ``ifin``/``ifout`` are interface names in the node's namespace (for
    bridged packets seen by iptables through br_netfilter they are the bridge,
    and ``physin``/``physout`` the ports).  ``src``/``dst``/``ip_id`` come from
    the IPv4 header as it was *at that hook*, so NAT rewrites are visible.
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

    @property
    def name(self) -> str:
        """``family:table:chain``, e.g. ``ip:nat:PREROUTING``."""
        return f"{self.family}:{self.table}:{self.chain}"


# --------------------------------------------------------------------------
# netlink plumbing


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _config_message(group: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Netlink attributes of one message body (type flags masked off)."""
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


def parse_packet(family: int, body: bytes) -> NflogMessage:
    """Decode the attributes of an NFULNL_MSG_PACKET (after the nfgenmsg)."""
    attrs = parse_attrs(body)

    def u32(kind: int) -> int | None:
        raw = attrs.get(kind)
        return struct.unpack("!I", raw[:4])[0] if raw else None

    hook = attrs[NFULA_PACKET_HDR][2] if NFULA_PACKET_HDR in attrs else -1
    stamp = None
    if NFULA_TIMESTAMP in attrs:
        sec, usec = struct.unpack("!QQ", attrs[NFULA_TIMESTAMP][:16])
        stamp = sec + usec / 1e6
    return NflogMessage(
        family=family,
        hook=hook,
        prefix=attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace"),
        seq=u32(NFULA_SEQ),
        indev=u32(NFULA_IFINDEX_INDEV),
        outdev=u32(NFULA_IFINDEX_OUTDEV),
        physindev=u32(NFULA_IFINDEX_PHYSINDEV),
        physoutdev=u32(NFULA_IFINDEX_PHYSOUTDEV),
        mark=u32(NFULA_MARK) or 0,
        timestamp=stamp,
        payload=attrs.get(NFULA_PAYLOAD, b""),
    )


def parse_datagram(data: bytes) -> tuple[list[NflogMessage], list[int]]:
    """Split one recv() into packet messages and netlink error codes (acks are 0)."""
    messages: list[NflogMessage] = []
    errors: list[int] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        body = data[offset + 16 : offset + length]
        if kind == NLMSG_ERROR:
            errors.append(-struct.unpack_from("=i", body)[0])
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            messages.append(parse_packet(body[0], body[4:]))
        offset += (length + 3) & ~3
    return messages, errors


NFLOG_QUIET_SECONDS = 0.02
"""How long :meth:`NflogListener.drain` waits for one more message.  A message is queued on our socket in
the packet's own context, as the packet passes the NFLOG rule (queue threshold 1, flush timeout 0: the
kernel sends each one at once), so once the traffic is over every message is already there; the wait only
covers a packet still being processed on the other CPU.  (It was 0.2 s: 0.4 s per traced check, 6 s of
the 57 s serial ``labctl run labs/``.)"""


class NflogListener:
    """An nfnetlink_log group bound from inside a namespace.

    The socket is created with the thread in the namespace, so it receives
    what NFLOG rules of *that* namespace log.  Messages are queued one per
    packet (queue threshold 1) and numbered (``NFULNL_CFG_F_SEQ``).
    """

    def __init__(self, namespace: str, group: int) -> None:
        self.namespace = namespace
        self.group = group
        self._seq = 0
        self._pending: list[NflogMessage] = []
        with netns.entered(namespace):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
            self.sock.bind((0, 0))
            self._configure()
        except Exception:
            self.sock.close()
            raise

    def _configure(self) -> None:
        self._request(_attr(NFULA_CFG_CMD, struct.pack("=Bxxx", NFULNL_CFG_CMD_BIND)))
        self._request(_attr(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET)))
        self._request(_attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1)))
        self._request(_attr(NFULA_CFG_TIMEOUT, struct.pack("!I", 0)))
        self._request(_attr(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)))

    def _request(self, attrs: bytes) -> None:
        """Send one config message and wait for its ack; OSError on refusal."""
        self._seq += 1
        self.sock.send(_config_message(self.group, attrs, self._seq))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            if not ready:
                break
            messages, errors = parse_datagram(self.sock.recv(1 << 16))
            self._pending.extend(messages)
            if errors:
                if errors[0]:
                    raise OSError(errors[0], f"nfnetlink_log group {self.group}: {os.strerror(errors[0])}")
                return
        raise TimeoutError(f"nfnetlink_log did not answer (group {self.group})")

    def drain(self, settle: float = NFLOG_QUIET_SECONDS, timeout: float = 5.0) -> list[NflogMessage]:
        """Everything received so far, waiting until ``settle`` seconds pass quietly (0: only what is there)."""
        messages, self._pending = self._pending, []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], settle)
            if not ready:
                break
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise TraceError("trace messages were lost (socket buffer overrun)") from exc
                raise
            messages.extend(parse_datagram(data)[0])
        return messages

    def close(self) -> None:
        try:
            self._request(_attr(NFULA_CFG_CMD, struct.pack("=Bxxx", NFULNL_CFG_CMD_UNBIND)))
        except OSError:
            pass
        finally:
            self.sock.close()


def open_listener(namespace: str, group: int | None = None) -> NflogListener:
    """Bind ``group``, or the first free group from a pid-derived start."""
    if group is not None:
        return NflogListener(namespace, group)
    start = 0x4C00 + (os.getpid() % 0x300)
    for candidate in range(start, start + 64):
        try:
            return NflogListener(namespace, candidate)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
    raise TraceError(f"no free nfnetlink_log group in {namespace}")


# --------------------------------------------------------------------------
# the tracer


@dataclass
class _Installed:
    ip_rules: list[str] = field(default_factory=list)
    bridge_rules: list[str] = field(default_factory=list)
    bridge_tables_before: list[str] = field(default_factory=list)
    nft_rules: int = 0


class HookTracer:
    """Record the netfilter tables/chains packets pass in ``namespace``, in order.

    ::

        with HookTracer(ns, match="-p udp --dport 5000") as tracer:
            send_the_packet()
        steps = tracer.steps()       # [HookStep(family='ip', table='raw', ...), ...]

    ``tables`` are iptables tables (legacy xtables); ``bridge_tables`` are
    ebtables tables (``"nat"``, ``"filter"``), traced only when given.
    ``nft`` adds the base chains of the namespace's own nf_tables tables
    (steps ``nft:FAMILY:TABLE:CHAIN``).  ``match`` is iptables match syntax
    limiting the trace to the lab's packets (translated for nft);
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
    ) -> None:
        unknown = [t for t in tables if t not in IP_CHAINS] + [t for t in bridge_tables if t not in BRIDGE_CHAINS]
        if unknown:
            raise ValueError(f"cannot trace tables {unknown}")
        self.namespace = namespace
        self.tables = tuple(tables)
        self.bridge_tables = tuple(bridge_tables)
        self.match = match
        self.bridge_match = bridge_match if bridge_match is not None else ebtables_match(match)
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
        if self._recorded and not self._installed.ip_rules and not self._installed.bridge_rules:
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
    )


def _ipv4_header(payload: bytes) -> tuple[str | None, str | None, int | None]:
    if len(payload) < 20 or payload[0] >> 4 != 4:
        return None, None, None
    ip_id = struct.unpack_from("!H", payload, 4)[0]
    return socket.inet_ntoa(payload[12:16]), socket.inet_ntoa(payload[16:20]), ip_id


def _interface_names(namespace: str) -> dict[int, str]:
    with netns.entered(namespace):
        return {index: name for index, name in socket.if_nameindex()}


_EB_TRANSLATION = {
    "-s": "--ip-src",
    "--source": "--ip-src",
    "-d": "--ip-dst",
    "--destination": "--ip-dst",
    "--sport": "--ip-sport",
    "--dport": "--ip-dport",
}


def ebtables_match(match: str) -> str:
    """Translate a simple iptables match (``-p udp --dport 53 -d 10.0.0.1``) to ebtables.

    Only the words listed in ``_EB_TRANSLATION`` and ``-p`` are understood;
    anything else needs an explicit ``bridge_match``.
    """
    from labctl.kernel import iptables  # python-iptables: imported only when rules are made

    words = iptables.tokenize(match)
    if not words:
        return ""
    out = ["-p", "IPv4"]
    i = 0
    while i < len(words):
        word = words[i].value
        if i + 1 >= len(words):
            raise ValueError(f"cannot translate {match!r} for ebtables; pass bridge_match")
        value = words[i + 1].value
        if word in ("-p", "--protocol"):
            out += ["--ip-proto", value]
        elif word in _EB_TRANSLATION:
            out += [_EB_TRANSLATION[word], value]
        else:
            raise ValueError(f"cannot translate {word!r} for ebtables; pass bridge_match")
        i += 2
    return " ".join(out)


def hook_name(number: int) -> str:
    """Hook number (as in the NFULA_PACKET_HDR) to its chain name."""
    return HOOKS[number] if 0 <= number < len(HOOKS) else str(number)
