"""One tracepoint hit (:class:`TraceEvent`) and the names a lab gives what it proves (:func:`stage_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field

TERMINAL_EVENTS = frozenset({"skb:kfree_skb", "skb:consume_skb"})
"""Events after which an skb no longer exists (its address may be reused)."""

TRANSMIT_EVENTS = frozenset({"net:net_dev_queue", "net:net_dev_start_xmit", "net:net_dev_xmit"})
"""A device sending the skb (on veth, the same call hands it to the peer's receive)."""

DEVICE_FIELDS = ("name", "dev", "dev_name", "br_dev")
"""Fields that hold a device name: ``name`` in net:*, ``dev`` in bridge/neigh/qdisc, ``dev_name`` in napi."""


Fields = dict[str, str | int]

Tail = tuple[int, int, str, str, str, Fields, str, str, tuple[str, ...], str | None, int | None, bool]
"""An event but its timestamp (:func:`_tail`): what a cache of parsed lines keeps."""


@dataclass(slots=True)
class TraceEvent:
    """One tracepoint hit, with fields named as in the event's format file.

    What every event is asked again and again -- its key, devices, skb address, context -- is worked
    out when it is made (once per distinct line of a burst: :func:`_tail`) and kept in slots.  Not a
    frozen dataclass: its ``__init__`` (``object.__setattr__`` per field) cost a burst's 1.2 million
    events 3 s; the line parser sets the slots itself (:func:`labctl.kernel.tracefs.lines.parse_lines`).
    Nobody changes an event once made, except a drop's ``location`` that its stack trace gives later
    (the device and skb address fields never change).
    """

    timestamp: float
    """CLOCK_MONOTONIC seconds (the session uses the ``mono`` trace clock): compare with time.monotonic()."""
    cpu: int
    pid: int
    comm: str
    system: str
    name: str
    fields: Fields
    flags: str = ""
    """The context column (``b.s1.``: BH off, serving a softirq, preempt depth 1), "" if absent."""
    key: str = field(init=False, repr=False, compare=False)
    """``system:name``."""
    devices: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """Every device named by the event (a bridge fdb update names the bridge and the port)."""
    device: str | None = field(init=False, repr=False, compare=False)
    """The device the event happened on, whichever field the event calls it (the first of ``devices``)."""
    skbaddr: int | None = field(init=False, repr=False, compare=False)
    in_interrupt: bool = field(init=False, repr=False, compare=False)
    """Ran in a softirq or hard irq (the task only lent its context), not in the task's own call."""

    def __post_init__(self) -> None:
        tail = _tail(self.cpu, self.pid, self.comm, self.system, self.name, self.fields, self.flags)
        self.key, self.devices, self.device, self.skbaddr, self.in_interrupt = tail[7:]

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


def _tail(cpu: int, pid: int, comm: str, system: str, name: str, fields: Fields, flags: str) -> Tail:
    """Everything of an event but its timestamp: the columns, and what is read from them on every use."""
    devices = tuple(v for n in DEVICE_FIELDS if isinstance(v := fields.get(n), str))
    addr = fields.get("skbaddr")
    return (
        cpu,
        pid,
        comm,
        system,
        name,
        fields,
        flags,
        f"{system}:{name}",
        devices,
        devices[0] if devices else None,
        addr if isinstance(addr, int) and addr else None,
        len(flags) >= 3 and flags[2] != ".",
    )


_new = object.__new__


def _event_at(timestamp: float, tail: Tail) -> TraceEvent:
    """The event of a cached line at ``timestamp``, its slots set from ``tail`` (no ``__init__``)."""
    event = _new(TraceEvent)
    event.timestamp = timestamp
    (
        event.cpu,
        event.pid,
        event.comm,
        event.system,
        event.name,
        event.fields,
        event.flags,
        event.key,
        event.devices,
        event.device,
        event.skbaddr,
        event.in_interrupt,
    ) = tail
    return event


def _event(
    timestamp: float, cpu: int, pid: int, comm: str, system: str, name: str, fields: Fields, flags: str
) -> TraceEvent:
    """``TraceEvent(...)``, positional (the line parser's slow path)."""
    return _event_at(timestamp, _tail(cpu, pid, comm, system, name, fields, flags))


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
