"""The state of one ``up`` on the kernel, shared by the build's steps.

:class:`Builder` is the topology's :class:`~labctl.lab.plan.Plan` plus what the run learns and makes: a
batched netlink handle per node, the nodes whose namespace it created, what the existing namespaces
already hold, the ifindex plan and the lines ``up`` prints.  The steps live in their own modules
(namespaces, netdevs, addressing, tuning, rulesets, settle) and :func:`labctl.lab.build.up` calls them in
order on one Builder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.lab.ifindex import IfindexPlan
from labctl.lab.plan import Plan

if TYPE_CHECKING:  # the model costs 0.1 s to import; down never needs it
    from labctl.kernel.links import NodeLinks
    from labctl.lab.virtual import VirtualBuilder
    from labctl.topology.model import Topology


class Builder(Plan):
    """Turns one topology into kernel objects through per-node netlink sockets."""

    def __init__(self, topo: Topology) -> None:
        super().__init__(topo)
        self.handles: dict[str, NodeLinks] = {}
        self.fresh: set[str] = set()  # nodes whose namespace this run created
        self.tables: dict[str, tuple[bool, bool]] = {}  # existing node -> (has iptables, has ebtables tables)
        self.nft_tables: dict[str, list[tuple[str, str]]] = {}  # existing node -> its nf_tables tables
        self.ip6_tables: dict[str, bool] = {}  # existing node -> has ip6tables (legacy) tables
        self.ipv6_unwritten: dict[str, dict[str, int]] = {}
        """Existing IPv6-off nodes whose all/default switches a converge did not write: their interfaces then."""
        self.traffic_changes: list[str] = []  # "a:eth0: tc replaced", "b: nftables loaded" (for up to print)
        self.ifindex = IfindexPlan(self.wanted_interfaces, self.fresh)
        self.changes: list[str] = []
        """What this run changed, one line each, for ``up`` to print: virtual interfaces and bridge settings
        always; links, removed interfaces, addresses and routes on a converge (a first build makes them all)."""
        self._virtual: VirtualBuilder | None = None

    @property
    def virtual(self) -> VirtualBuilder:
        """The virtual interface and bridge-settings steps (labctl/lab/virtual.py), once the handles exist."""
        if self._virtual is None:
            from labctl.lab.virtual import VirtualBuilder

            self._virtual = VirtualBuilder(self.topo, self.handles, self.fresh)
            self._virtual.changes = self.changes
        return self._virtual

    def commit(self) -> None:
        """Send every node's queued changes (the next step depends on them)."""
        for handle in self.handles.values():
            handle.commit()

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
