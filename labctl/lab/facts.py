"""What this kernel offers, read once for load-time validation of checks (before anything is built).

The expectation kinds judge names against these facts without reading the
kernel themselves: drop reasons from the kfree_skb format, tracepoints from
tracefs, counter names from this namespace's /proc files (every namespace
has the same names), the tables the hook tracer can walk.
"""

from __future__ import annotations

import functools
import os

from labctl.expect.base import MachineFacts

LINK_COUNTERS = frozenset(
    [
        "rx_packets",
        "tx_packets",
        "rx_bytes",
        "tx_bytes",
        "rx_errors",
        "tx_errors",
        "rx_dropped",
        "tx_dropped",
        "multicast",
        "collisions",
        "rx_length_errors",
        "rx_over_errors",
        "rx_crc_errors",
        "rx_frame_errors",
        "rx_fifo_errors",
        "rx_missed_errors",
        "tx_aborted_errors",
        "tx_carrier_errors",
        "tx_fifo_errors",
        "tx_heartbeat_errors",
        "tx_window_errors",
        "rx_compressed",
        "tx_compressed",
        "rx_nohandler",
    ]
)
"""stats64 names of ``ip -s link`` (what a counter key ``IFACE.name`` may name)."""


def _snmp_names() -> frozenset[str]:
    from labctl.kernel.counters import parse_snmp, parse_snmp6

    names: set[str] = set()
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            with open(path) as f:
                names |= set(parse_snmp(f.read()))
        except OSError:
            continue
    try:
        with open("/proc/net/snmp6") as f:
            names |= set(parse_snmp6(f.read()))
    except OSError:
        pass
    return frozenset(names)


def _tracepoints() -> frozenset[str]:
    from labctl.kernel.tracefs import TRACEFS, available_events

    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        return frozenset()
    return frozenset(f"{system}:{event}" for system, events in available_events().items() for event in events)


@functools.cache
def machine_facts() -> MachineFacts:
    from labctl.kernel.broute import broute_available  # not ebtables: that imports python-iptables
    from labctl.kernel.counters import QDISC_QUEUE_KEYS
    from labctl.kernel.nftrace import BRIDGE_CHAINS, IP_CHAINS
    from labctl.kernel.tracefs import drop_reason_names

    return MachineFacts(
        drop_reasons=frozenset(drop_reason_names()),
        tracepoints=_tracepoints(),
        snmp_counters=_snmp_names(),
        link_counters=LINK_COUNTERS,
        qdisc_counters=frozenset(QDISC_QUEUE_KEYS),
        ip_tables={t: tuple(c) for t, c in IP_CHAINS.items()},
        bridge_tables={t: tuple(c) for t, c in BRIDGE_CHAINS.items()}
        | ({"broute": ("BROUTING",)} if broute_available() else {}),  # legacy ebtables' broute (Debian's 6.1)
    )
