"""Small kernel topologies for the kernel-layer tests, built with labctl's own kernel layer.

One :class:`Topo` per test (the ``topo`` fixture) makes namespaces, veth pairs,
bridges, addresses and routes through :mod:`labctl.kernel.netns`,
:class:`~labctl.kernel.links.NodeLinks` and :mod:`labctl.kernel.sysctl`, and
always removes every namespace it made -- and only those.  Namespaces are named
``labctl-t<pid>k<n>.<node>``, so ``labctl clean`` finds what a killed run left
behind, and concurrent runs (other pids, other labs) never collide.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

from labctl.kernel import netns, sysctl
from labctl.kernel.links import LinkAttrs, NodeLinks
from tests.hostcheck import host_snapshot

NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
"""Set before any link exists: no router solicitations or DAD frames in captures, traces or counters."""

OPERATIONAL_TIMEOUT = 5.0

_labs = itertools.count()


@dataclass
class VethPair:
    """Two namespaces joined by a veth pair: ``ns_a:dev_a`` (``addr_a``/24) ↔ ``ns_b:dev_b`` (``addr_b``/24)."""

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str

    def socket_a(self) -> socket.socket:
        """A UDP socket of namespace ``a``."""
        with netns.entered(self.ns_a):
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send_to_b(self, payload: bytes, count: int, port: int) -> None:
        """``count`` datagrams from ``a`` to ``addr_b:port``, over one socket."""
        sock = self.socket_a()
        try:
            for _ in range(count):
                sock.sendto(payload, (self.addr_b, port))
        finally:
            sock.close()


P = TypeVar("P", bound=VethPair)


class Topo:
    """Namespaces, veth pairs and bridges of one test; :meth:`close` removes them all."""

    def __init__(self) -> None:
        self.lab = f"t{os.getpid()}k{next(_labs)}"
        self.created: list[str] = []
        self._links: dict[str, NodeLinks] = {}

    # -- namespaces ---------------------------------------------------------
    def node(self, name: str) -> str:
        """A fresh namespace for ``name``: IPv6 off, ``lo`` up; returns its full name."""
        ns = netns.namespace_name(self.lab, name)
        netns.create(ns)
        self.created.append(ns)
        sysctl.write_many(NO_IPV6, ns)
        links = self.links(ns)
        links.refresh({"lo"})
        links.configure("lo", LinkAttrs())
        return ns

    def namespaces(self, *names: str) -> list[str]:
        return [self.node(name) for name in names]

    def links(self, ns: str) -> NodeLinks:
        """The one netlink handle of ``ns`` (opened on first use, closed by :meth:`close`)."""
        if ns not in self._links:
            self._links[ns] = NodeLinks(ns)
        return self._links[ns]

    # -- links ----------------------------------------------------------------
    def veth(
        self,
        a: str,
        if_a: str,
        b: str,
        if_b: str,
        addr_a: str | None = None,
        addr_b: str | None = None,
        *,
        mac_a: str | None = None,
        mac_b: str | None = None,
    ) -> None:
        """``a:if_a`` <-> ``b:if_b``, both ends up, addressed (CIDR) and carrying traffic."""
        links_a, links_b = self.links(a), self.links(b)
        links_a.add_veth(if_a, LinkAttrs(mac=mac_a), if_b, b, LinkAttrs(mac=mac_b))
        links_a.refresh({if_a})
        links_b.refresh({if_b})
        links_b.configure(if_b, LinkAttrs())
        for ns, ifname, cidr in ((a, if_a, addr_a), (b, if_b, addr_b)):
            if cidr:
                self.address(ns, ifname, cidr)
        self.wait_operational(a, [if_a])
        self.wait_operational(b, [if_b])

    def bridge(self, ns: str, name: str, ports: Iterable[str], address: str | None = None) -> None:
        """A bridge (STP off) in ``ns`` over existing ``ports``, up and carrying traffic."""
        links = self.links(ns)
        links.add_bridge(name, LinkAttrs(), stp=False, ageing_time=300, forward_delay=0)
        for port in ports:
            links.configure(port, LinkAttrs(master=name))
        if address:
            self.address(ns, name, address)
        self.wait_operational(ns, [name])

    def pair(self, kind: type[P], tag: str, addr_a: str, addr_b: str) -> P:
        """Nodes ``<tag>a`` and ``<tag>b`` joined by ``<tag>a<pid>`` ↔ ``<tag>b<pid>``, as a ``kind`` of VethPair.

        The device names are unique on the host, because trace events and
        softnet-wide observations carry only device names.
        """
        ns_a, ns_b = self.namespaces(f"{tag}a", f"{tag}b")
        pair = kind(ns_a, ns_b, f"{tag}a{os.getpid()}", f"{tag}b{os.getpid()}", addr_a, addr_b)
        self.veth(ns_a, pair.dev_a, ns_b, pair.dev_b, f"{addr_a}/24", f"{addr_b}/24")
        return pair

    def routed(self) -> tuple[str, str, str]:
        """a (10.99.1.1) --eth0/eth0-- r (10.99.1.254 | 10.99.2.254) --eth1/eth0-- b (10.99.2.1), r forwards."""
        a, r, b = self.namespaces("a", "r", "b")
        self.veth(a, "eth0", r, "eth0", "10.99.1.1/24", "10.99.1.254/24")
        self.veth(r, "eth1", b, "eth0", "10.99.2.254/24", "10.99.2.1/24")
        self.route(a, "10.99.2.0/24", "10.99.1.254")
        self.route(b, "10.99.1.0/24", "10.99.2.254")
        sysctl.write_many({"net.ipv4.ip_forward": "1"}, r)
        return a, r, b

    def address(self, ns: str, ifname: str, cidr: str) -> None:
        self.links(ns).add_address(ifname, cidr)

    def route(self, ns: str, dst: str, via: str) -> None:
        self.links(ns).replace_route(dst, via, None)

    def mac(self, ns: str, ifname: str) -> str:
        return self.links(ns).links()[ifname].mac

    def wait_operational(self, ns: str, names: Iterable[str]) -> None:
        """Until linkwatch has activated the devices' queues.

        Before that a device transmits through the noop qdisc, which silently
        drops the first frames (typically the ARP request).  Linkwatch sets the
        operstate and then activates the queues under RTNL, so once the
        operstate is UP, a request that takes RTNL (a qdisc dump) returns only
        after the activation has finished.
        """
        links = self.links(ns)
        pending = links.wait_operational(set(names), timeout=OPERATIONAL_TIMEOUT)
        if pending:
            raise OSError(f"{', '.join(pending)} in {ns} not operational after {OPERATIONAL_TIMEOUT}s")
        links.ipr.get_qdiscs()

    # -- teardown -------------------------------------------------------------
    def close(self) -> None:
        """Close the netlink handles and remove every namespace this topology made."""
        with contextlib.ExitStack() as stack:  # each step runs even if an earlier one raised
            for ns in self.created:
                stack.callback(netns.remove, ns)
            for links in self._links.values():
                stack.callback(links.close)
        self._links.clear()
        self.created.clear()


@pytest.fixture
def topo() -> Iterator[Topo]:
    """A :class:`Topo` whose namespaces are removed after the test, whatever happened."""
    built = Topo()
    try:
        yield built
    finally:
        built.close()


# --------------------------------------------------------------------------
# root namespace guard


def root_firewall() -> dict[str, str]:
    """The root namespace's firewall (legacy and nft), counters and timestamps masked."""
    snapshot = host_snapshot()
    with open("/proc/net/ip_tables_names") as f:
        tables = " ".join(sorted(f.read().split()))
    return {key: snapshot[key] for key in ("iptables-legacy", "iptables-nft", "nft")} | {"xtables": tables}


@pytest.fixture(scope="module")
def root_untouched() -> Iterator[None]:
    """Nothing the module's tests do may change the root namespace's firewall."""
    before = root_firewall()
    yield
    assert root_firewall() == before
