"""The ifindex each device is born with in a namespace this run created: no lookups, no collisions.

The kernel numbers other devices (bridges, taps, peers arriving from other nodes) from 2 upward, one by
one; explicit numbers start above all the devices the node will ever hold, so they can never collide --
plus room for the fallback devices a tunnel module puts in every namespace, old and new, when it loads
(gre0, gretap0, erspan0, tunl0, sit0, ip6tnl0, ...: on a modular kernel a lab's GRE link loads ip_gre
mid-build, and every later namespace starts with them).

When the run creates both namespaces, a veth's two ends never get the same number, though the kernel
would allow it: the kernel's linkwatch
(net/core/link_watch.c, linkwatch_urgent_event) treats a device whose ifindex equals its iflink -- a veth's
iflink is its peer's ifindex -- as not urgent, and sets it operational only at its next batch, up to a
second later when another link changed within the second (two alike nodes' eth0s both got 37: a lab with a
vxlan waited 0.8 s in its settle).
"""

from __future__ import annotations

from collections.abc import Collection, Container, Mapping

FALLBACK_DEVICE_ROOM = 32
"""ifindexes left free for the kernel's per-namespace fallback tunnel devices (about ten exist)."""


class IfindexPlan:
    """Hands out explicit ifindexes, node by node, for the namespaces in ``fresh``.

    ``wanted_interfaces`` (every interface each node will hold) and ``fresh`` (the nodes whose namespace
    this run created, filled as the namespaces step runs) are the builder's own, read when asked.
    """

    def __init__(self, wanted_interfaces: Mapping[str, Collection[str]], fresh: Container[str]) -> None:
        self.wanted_interfaces = wanted_interfaces
        self.fresh = fresh
        self.last: dict[str, int] = {}
        """The ifindex last handed out per node (a veth's peer is recorded under it)."""

    def next(self, node: str, unlike: int | None = None) -> int | None:
        """An ifindex to ask for in a namespace this run created (None elsewhere: the kernel picks), never
        ``unlike``."""
        if node not in self.fresh:
            return None
        start = 2 + len(self.wanted_interfaces[node]) + FALLBACK_DEVICE_ROOM
        number = self.last.get(node, start) + 1
        self.last[node] = number + 1 if number == unlike else number
        return self.last[node]
