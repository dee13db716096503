"""Which node (and device) each event of an skb happened in, following it through the lab's links."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from labctl.kernel.tracefs import TRANSMIT_EVENTS, TraceEvent
from labctl.lab.trace.knowledge import Knowledge

RX_EVENTS = frozenset(
    {
        "net:netif_rx",
        "net:netif_receive_skb",
        "net:napi_gro_receive_entry",
        "net:netif_receive_skb_entry",
        "net:netif_receive_skb_list_entry",
        "net:netif_rx_entry",
        "net:napi_gro_frags_entry",
    }
)


@dataclass
class Placed:
    event: TraceEvent
    node: str | None
    device: str | None
    kind: Literal["tx", "rx", "other"]


def event_kind(event: TraceEvent) -> Literal["tx", "rx", "other"]:
    if event.key in TRANSMIT_EVENTS or event.system == "qdisc":
        return "tx"
    if event.key in RX_EVENTS:
        return "rx"
    return "other"


class Timeline:
    """Where (which node) each CPU was working a moment ago, from the events placed so far.

    A skb born inside the kernel (an ARP request, an ICMP error, an echo
    reply) starts with a transmit on a device whose name several nodes have;
    it is born in softirq context, in the middle of handling a placed skb on
    the same CPU and task, in the node that answers.  Only that immediate
    past counts (same CPU, same task, within :data:`CAUSE_WINDOW`): the task
    itself may live in another node (softirqs run in whoever's context).

    The text trace has microsecond timestamps, and a veth hop takes about one,
    so events are ordered by their position in the stream (``order``: the
    kernel merges the per-CPU buffers in nanosecond order), not by time alone.
    """

    def __init__(self, order: dict[int, int] | None = None) -> None:
        self.order = order if order is not None else {}
        """id(event) → position in the event stream."""
        self._keys: dict[int, list[tuple[float, int]]] = {}
        self._where: dict[int, list[tuple[str, int]]] = {}

    def key(self, event: TraceEvent) -> tuple[float, int]:
        return event.timestamp, self.order.get(id(event), -1)

    def add(self, placed: Iterable[Placed]) -> None:
        for item in placed:
            if item.node is None:
                continue
            keys = self._keys.setdefault(item.event.cpu, [])
            where = self._where.setdefault(item.event.cpu, [])
            at = bisect.bisect_right(keys, self.key(item.event))
            keys.insert(at, self.key(item.event))
            where.insert(at, (item.node, item.event.pid))

    def node_before(self, event: TraceEvent) -> str | None:
        """The node of the placed event that ran just before ``event`` on its CPU, in its task."""
        keys = self._keys.get(event.cpu, [])
        at = bisect.bisect_left(keys, self.key(event))
        if not at or event.timestamp - keys[at - 1][0] > CAUSE_WINDOW:
            return None
        node, pid = self._where[event.cpu][at - 1]
        return node if pid == event.pid else None

    def forget(self, before: float) -> None:
        """Drop what is older than ``before`` (a live view runs for hours)."""
        for cpu, keys in self._keys.items():
            at = bisect.bisect_left(keys, (before, -1))
            del keys[:at]
            del self._where[cpu][:at]


CAUSE_WINDOW = 0.001
"""Seconds between the event that caused a new skb and the new skb's first transmit."""


Hint = Callable[[TraceEvent], "str | None"]


class Placer:
    """Puts each event of one skb in a node, following the skb through the lab's links."""

    def __init__(self, knowledge: Knowledge) -> None:
        self.k = knowledge

    def _node_for(self, device: str, here: str | None, event: TraceEvent, hints: Sequence[Hint]) -> str | None:
        if here is not None and device in self.k.devices.get(here, ()):
            return here
        for hint in hints:
            node = hint(event)
            if node is not None and device in self.k.devices.get(node, ()):
                return node
        owners = self.k.owners.get(device, [])
        return owners[0] if len(owners) == 1 else None

    def receiver_by_fib(self, event: TraceEvent) -> str | None:
        """The node that received ``event``, from the fib lookup its IP layer made right after.

        The lookup names the input ifindex and the packet's addresses: the node
        with that device at that index that owns the destination (or whose
        link's far end owns the source) is the receiver.
        """
        if event.device is None:
            return None
        fib = self.k.fib_between(event.timestamp, event.timestamp + 0.001, event.cpu, None, None, any_iif=True)
        if fib is None:
            return None
        iif = fib.fields.get("iif")
        candidates = [
            node
            for node in self.k.owners.get(event.device, [])
            if self.k.ifindex.get(node, {}).get(event.device) == iif
        ]
        for address, owner_of in ((fib.fields.get("dst"), "self"), (fib.fields.get("src"), "far")):
            owner = self.k.addresses.get(str(address))
            if owner is None:
                continue
            fits = [
                n
                for n in candidates
                if (owner == n if owner_of == "self" else self.k.far.get((n, event.device), ("",))[0] == owner)
            ]
            if len(fits) == 1:
                return fits[0]
        return None

    def _anchor(self, events: Sequence[TraceEvent], hints: Sequence[Hint]) -> tuple[str, str] | None:
        """Where a chain whose first transmit nothing can place started: the far end of its receiver."""
        first = events[0] if events else None
        if first is None or first.device is None or event_kind(first) != "tx":
            return None
        if self._node_for(first.device, None, first, hints) is not None:
            return None
        receive = next((e for e in events[1:] if e.key == "net:netif_receive_skb"), None)
        receiver = self.receiver_by_fib(receive) if receive is not None else None
        if receive is None or receiver is None or receive.device is None:
            return None
        far = self.k.far.get((receiver, receive.device))
        return far if far is not None and far[1] == first.device else None

    def place(
        self, events: Sequence[TraceEvent], start: tuple[str, str] | None = None, hints: Sequence[Hint] = ()
    ) -> tuple[list[Placed], list[tuple[tuple[str, str], tuple[str, str]]]]:
        """(placed events, hops as ((tx node, dev), (rx node, dev))) for one skb's events."""
        if start is None:
            start = self._anchor(events, hints)
        here = start[0] if start else None
        device = start[1] if start else None
        pending: tuple[str, str] | None = None  # the last transmit, waiting for its far end
        last_xmit: tuple[str, str] | None = None  # the driver transmit that net_dev_xmit completes
        placed: list[Placed] = []
        hops: list[tuple[tuple[str, str], tuple[str, str]]] = []
        provisional = start is None  # the first node comes from a hint until a link confirms it
        for event in events:
            kind = event_kind(event)
            dev = event.device
            node: str | None
            if dev is None:
                placed.append(Placed(event, here, device, kind))
                continue
            if event.key == "net:net_dev_xmit" and last_xmit is not None and last_xmit[1] == dev:
                placed.append(Placed(event, last_xmit[0], dev, kind))
                continue
            if kind == "rx" and pending is not None and provisional:
                pending = self._confirm(pending, dev, placed)
                last_xmit = pending if last_xmit is not None else None
            if kind == "rx" and pending is not None and self.k.far.get(pending, ("", ""))[1] == dev:
                node = self.k.far[pending][0]
                hops.append((pending, (node, dev)))
                pending = None
            else:
                node = self._node_for(dev, here, event, hints)
            if node is not None and kind == "rx":
                provisional = False
            if node is not None:
                here, device = node, dev
                if kind == "tx":
                    pending = (node, dev)
                    if event.key == "net:net_dev_start_xmit":
                        last_xmit = (node, dev)
            placed.append(Placed(event, node, dev, kind))
        return placed, hops

    def _confirm(self, pending: tuple[str, str], rx_device: str, placed: list[Placed]) -> tuple[str, str]:
        """Check a hinted first transmit against the link it went out on; move it if another node fits.

        When the receive that follows names a device the hinted node's link
        does not lead to, and exactly one node owning the transmit device has
        a link that does, the transmit was that node's: the events placed so
        far are moved there.
        """
        node, dev = pending
        if self.k.far.get(pending, ("", ""))[1] == rx_device:
            return pending
        fits = [n for n in self.k.owners.get(dev, []) if self.k.far.get((n, dev), ("", ""))[1] == rx_device]
        if len(fits) != 1:
            return pending
        for item in placed:
            if item.node == node:
                item.node = fits[0]
        return fits[0], dev
