"""One tracepoint hit (:class:`TraceEvent`) and the names a lab gives what it proves (:func:`stage_of`)."""

from __future__ import annotations

from dataclasses import dataclass

TERMINAL_EVENTS = frozenset({"skb:kfree_skb", "skb:consume_skb"})
"""Events after which an skb no longer exists (its address may be reused)."""
TERMINAL_NAMES = frozenset(key.partition(":")[2] for key in TERMINAL_EVENTS)
"""Their names (all in the ``skb`` system): a comparison per event cheaper than building the key."""

DEVICE_FIELDS = ("name", "dev", "dev_name", "br_dev")
"""Fields that hold a device name: ``name`` in net:*, ``dev`` in bridge/neigh/qdisc, ``dev_name`` in napi."""


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One tracepoint hit, with fields named as in the event's format file."""

    timestamp: float
    """CLOCK_MONOTONIC seconds (the session uses the ``mono`` trace clock): compare with time.monotonic()."""
    cpu: int
    pid: int
    comm: str
    system: str
    name: str
    fields: dict[str, str | int]
    flags: str = ""
    """The context column (``b.s1.``: BH off, serving a softirq, preempt depth 1), "" if absent."""

    @property
    def in_interrupt(self) -> bool:
        """Ran in a softirq or hard irq (the task only lent its context), not in the task's own call."""
        return len(self.flags) >= 3 and self.flags[2] != "."

    @property
    def key(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def device(self) -> str | None:
        """The device the event happened on, whichever field the event calls it."""
        for name in DEVICE_FIELDS:
            value = self.fields.get(name)
            if isinstance(value, str):
                return value
        return None

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device named by the event (a bridge fdb update names the bridge and the port)."""
        return tuple(v for n in DEVICE_FIELDS if isinstance(v := self.fields.get(n), str))

    @property
    def skbaddr(self) -> int | None:
        value = self.fields.get("skbaddr")
        return value if isinstance(value, int) and value else None

    @property
    def location(self) -> str | None:
        value = self.fields.get("location")
        return value if isinstance(value, str) else None

    @property
    def function(self) -> str | None:
        """Bare function name of ``location`` (``ip_rcv_core`` for ``ip_rcv_core+0x1b/0x2a0``)."""
        loc = self.location
        return loc.split("+", 1)[0] if loc else None

    @property
    def reason(self) -> str | None:
        value = self.fields.get("reason")
        return value if isinstance(value, str) else None

    @property
    def protocol(self) -> int | None:
        """The skb's ethertype, for events that record it (net_dev_start_xmit, *_entry, kfree_skb)."""
        value = self.fields.get("protocol")
        return value if isinstance(value, int) else None

    def names(self) -> tuple[str, ...]:
        """The forms an expectation may use: ``net:netif_rx`` and ``net:netif_rx@eth0``."""
        return (self.key, *(f"{self.key}@{dev}" for dev in self.devices))


_SETTERS = tuple(getattr(TraceEvent, name).__set__ for name in TraceEvent.__slots__)


def _event(
    timestamp: float, cpu: int, pid: int, comm: str, system: str, name: str, fields: dict[str, str | int], flags: str
) -> TraceEvent:
    """``TraceEvent(...)`` at a third less cost: the slots set directly, not through the frozen
    dataclass's ``__init__`` (a burst builds 400,000 of them; the class stays frozen for everyone else)."""
    event = object.__new__(TraceEvent)
    set_timestamp, set_cpu, set_pid, set_comm, set_system, set_name, set_fields, set_flags = _SETTERS
    set_timestamp(event, timestamp)
    set_cpu(event, cpu)
    set_pid(event, pid)
    set_comm(event, comm)
    set_system(event, system)
    set_name(event, name)
    set_fields(event, fields)
    set_flags(event, flags)
    return event


_STAGES = {
    "net:netif_rx": "netif_rx → backlog",
    "net:netif_receive_skb": "netif_receive_skb",
    "net:napi_gro_receive_entry": "napi_gro_receive",
    "net:net_dev_queue": "dev_queue_xmit",
    "net:net_dev_start_xmit": "driver xmit",
    "skb:consume_skb": "consumed",
    "skb:skb_copy_datagram_iovec": "copied to user (recvmsg)",
    "bridge:br_fdb_update": "bridge fdb update",
    "fib:fib_table_lookup": "fib lookup",
    "qdisc:qdisc_enqueue": "qdisc enqueue",
    "qdisc:qdisc_dequeue": "qdisc dequeue",
    "napi:napi_poll": "napi poll",
}


def stage_of(event: TraceEvent) -> str:
    """The notes' name for the path stage an event proves."""
    if event.key == "skb:kfree_skb":
        return f"dropped: {event.reason or event.fields.get('reason', '?')} at {event.function or '?'}"
    if event.key == "net:net_dev_xmit":
        rc = event.fields.get("rc", 0)
        return "tx done" if rc == 0 else f"tx done (rc={rc})"
    return _STAGES.get(event.key, event.key)
