"""Interfaces, addresses and routes of one namespace, over one netlink socket.

One :class:`NodeLinks` per namespace holds a single rtnetlink socket opened
inside it, so a whole node is configured without a helper process and with
as few round trips as the kernel allows: a veth is created with both ends
already in their namespaces (nothing ever appears in the root namespace),
with master, MTU, MAC and state in the same request.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import Ethtool, IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from labctl.kernel import netns
from labctl.kernel.sysfs import write_in_namespace

IFF_UP = 0x1
IFF_PROMISC = 0x100
RTPROT_LABCTL = 4  # "static": routes labctl added, so converge only touches its own
ROUTE_TABLE_MAIN = 254


@dataclass(frozen=True)
class LinkAttrs:
    """Settings applied to an interface at creation or on converge."""

    mac: str | None = None
    mtu: int | None = None
    txqueuelen: int | None = None
    promisc: bool = False
    up: bool = True
    master: str | None = None
    detach: bool = False
    """With no master: take the interface out of any bridge it is in (converge)."""


@dataclass
class LinkInfo:
    """What the kernel says about an interface (the status view and converge use it)."""

    index: int
    name: str
    kind: str
    up: bool
    carrier: bool
    promisc: bool
    mac: str
    mtu: int
    txqueuelen: int
    master: str | None
    addresses: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def _kernel_error(what: str, namespace: str, exc: NetlinkError) -> OSError:
    return OSError(exc.code, f"{what} in {namespace}: {os.strerror(exc.code)}")


class NodeLinks:
    """Netlink access to one namespace; create it once per node and reuse it."""

    def __init__(self, namespace: str, ipr: IPRoute | None = None) -> None:
        self.namespace = namespace
        self.ipr = ipr if ipr is not None else netns.netlink(namespace)
        self.index: dict[str, int] = {}

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> NodeLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------
    def refresh(self, names: set[str] | None = None) -> dict[str, int]:
        """Learn interface indexes after a batch of creations.

        Decoding a whole dump is pyroute2's main cost in big labs, so a node
        that only needs a few names asks for those names; otherwise one dump.
        """
        if names is not None and len(names) <= 3:
            for name in names:
                msgs = self._get(name)
                if msgs:
                    self.index[name] = msgs[0]["index"]
            return self.index
        self.index = {msg.get("ifname"): msg["index"] for msg in self.ipr.get_links()}
        return self.index

    def _get(self, name: str) -> list[Any]:
        try:
            return list(self.ipr.link("get", ifname=name))
        except NetlinkError:
            return []

    def links(self) -> dict[str, LinkInfo]:
        """One dump of every interface; also refreshes the name -> index cache."""
        raw = list(self.ipr.get_links())
        by_index = {msg["index"]: msg.get("ifname") for msg in raw}
        result: dict[str, LinkInfo] = {}
        for msg in raw:
            name = msg.get("ifname")
            kind = msg.get(("linkinfo", "kind")) or ("loopback" if name == "lo" else "device")
            stats = msg.get("stats64")
            master = msg.get("master")
            result[name] = LinkInfo(
                index=msg["index"],
                name=name,
                kind=kind,
                up=bool(msg["flags"] & IFF_UP),
                carrier=bool(msg.get("carrier")),
                promisc=bool(msg["flags"] & IFF_PROMISC),
                mac=msg.get("address") or "",
                mtu=msg.get("mtu") or 0,
                txqueuelen=msg.get("txqlen") or 0,
                master=by_index.get(master) if master else None,
                stats={k: v for k, v in stats.items() if isinstance(v, int)} if stats else {},
            )
        self.index = {name: info.index for name, info in result.items()}
        for name, addrs in self.addresses().items():
            if name in result:
                result[name].addresses = addrs
        return result

    def addresses(self) -> dict[str, list[str]]:
        names = {index: name for name, index in self.index.items()}
        found: dict[str, list[str]] = {}
        for msg in self.ipr.get_addr():
            name = names.get(msg["index"], str(msg["index"]))
            found.setdefault(name, []).append(f"{msg.get('address')}/{msg['prefixlen']}")
        return found

    def routes(self, own_only: bool = False) -> list[dict[str, Any]]:
        names = {index: name for name, index in self.index.items()}
        result = []
        for family in (2, 10):
            for msg in self.ipr.get_routes(family=family, table=ROUTE_TABLE_MAIN):
                if own_only and msg["proto"] != RTPROT_LABCTL:
                    continue
                dst = msg.get("dst")
                result.append(
                    {
                        "dst": f"{dst}/{msg['dst_len']}" if dst else "default",
                        "via": msg.get("gateway"),
                        "dev": names.get(msg.get("oif")),
                        "proto": msg["proto"],
                        "family": family,
                    }
                )
        return result

    def wait_operational(self, names: set[str], timeout: float = 2.0) -> list[str]:
        """Wait until ``names`` are operationally up; returns those that never were.

        A veth's queue drops everything until linkwatch has activated it, and
        operstate turns UP in the same step: polling it is what makes the very
        first frame of a check arrive (an ARP request otherwise vanishes).
        """
        deadline = time.monotonic() + timeout
        while True:
            if len(names) <= 3:
                msgs = [msg for name in names for msg in self._get(name)]
            else:
                msgs = [msg for msg in self.ipr.get_links() if msg.get("ifname") in names]
            pending = [msg.get("ifname") for msg in msgs if msg.get("operstate") not in ("UP", "UNKNOWN")]
            if not pending or time.monotonic() > deadline:
                return pending
            time.sleep(0.005)

    def learnt_macs(self, bridge: str) -> list[str]:
        """MACs the bridge learnt on its ports (the fdb minus permanent local entries)."""
        NUD_PERMANENT = 0x80
        found = []
        for msg in self.ipr.get_neighbours(family=7, master=self.index[bridge]):  # AF_BRIDGE
            if msg["state"] & NUD_PERMANENT:
                continue
            mac = msg.get("lladdr")
            if mac and mac not in found:
                found.append(mac)
        return found

    # -- creating --------------------------------------------------------
    def _attrs(self, attrs: LinkAttrs) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if attrs.mac:
            kwargs["address"] = attrs.mac
        if attrs.mtu:
            kwargs["mtu"] = attrs.mtu
        if attrs.txqueuelen is not None:
            kwargs["txqlen"] = attrs.txqueuelen
        if attrs.master:
            kwargs["master"] = self.index[attrs.master]
        elif attrs.detach:
            kwargs["master"] = 0
        flags = (IFF_UP if attrs.up else 0) | (IFF_PROMISC if attrs.promisc else 0)
        kwargs["flags"] = flags
        kwargs["change"] = IFF_UP | IFF_PROMISC
        return kwargs

    def _request(self, what: str, command: str, **kwargs: Any) -> None:
        try:
            self.ipr.link(command, **kwargs)
        except NetlinkError as exc:
            raise _kernel_error(what, self.namespace, exc) from exc

    def add_bridge(self, name: str, attrs: LinkAttrs, *, stp: bool, ageing_time: float, forward_delay: float) -> None:
        options = {
            "br_stp_state": 1 if stp else 0,
            "br_ageing_time": int(ageing_time * 100),  # centiseconds
            "br_forward_delay": int(forward_delay * 100),
        }
        command = "set" if name in self.index else "add"
        target = {"index": self.index[name]} if command == "set" else {"ifname": name}
        self._request(f"bridge {name}", command, kind="bridge", **target, **options, **self._attrs(attrs))
        if command == "add":
            self._learn(name)

    def add_veth(
        self,
        name: str,
        attrs: LinkAttrs,
        peer_name: str,
        peer_namespace: str,
        peer: LinkAttrs,
        index: int | None = None,
    ) -> None:
        """Create a veth whose peer is born inside ``peer_namespace`` (never in the root one).

        With ``index`` the near end gets that ifindex, so it is known without
        asking; the peer's is learnt later only if something needs it
        (:meth:`ensure_indexes`) -- each lookup is a round trip per link.
        """
        peer_spec: dict[str, Any] = {"ifname": peer_name}
        if peer.mac:
            peer_spec["address"] = peer.mac
        if peer.mtu:
            peer_spec["mtu"] = peer.mtu
        fd = os.open(netns.path(peer_namespace), os.O_RDONLY)
        try:
            peer_spec["net_ns_fd"] = fd
            chosen = {"index": index} if index is not None else {}
            self._request(
                f"veth {name}", "add", ifname=name, kind="veth", peer=peer_spec, **chosen, **self._attrs(attrs)
            )
        finally:
            os.close(fd)
        if index is not None:
            self.index[name] = index

    def add_tap(self, name: str) -> None:
        """A persistent tap device; its frames go to whoever opens it (the VM relay)."""
        with netns.entered(self.namespace):
            self._request(f"tap {name}", "add", ifname=name, kind="tuntap", mode="tap")

    def _learn(self, name: str) -> None:
        indexes = self.ipr.link_lookup(ifname=name)
        if not indexes:
            raise OSError(f"{name} vanished right after creation in {self.namespace}")
        self.index[name] = indexes[0]

    def configure(self, name: str, attrs: LinkAttrs) -> None:
        """Set attributes; by name when the index is not known (the kernel resolves it, no lookup)."""
        target = {"index": self.index[name]} if name in self.index else {"ifname": name}
        self._request(f"interface {name}", "set", **target, **self._attrs(attrs))

    def ensure_indexes(self, names: set[str]) -> None:
        """Learn the indexes of ``names`` that are not known yet (addresses and qdiscs need them)."""
        missing = names - set(self.index)
        if missing:
            self.refresh(missing)

    def delete(self, name: str) -> None:
        """Delete an interface; one already gone (a veth whose peer's namespace died) is fine."""
        try:
            self.ipr.link("del", index=self.index.pop(name))
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise _kernel_error(f"interface {name}", self.namespace, exc) from exc

    # -- addresses and routes --------------------------------------------
    def add_address(self, name: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        try:
            self.ipr.addr("add", index=self.index[name], address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            raise _kernel_error(f"address {cidr} on {name}", self.namespace, exc) from exc

    def del_address(self, name: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        self.ipr.addr("del", index=self.index[name], address=str(iface.ip), prefixlen=iface.network.prefixlen)

    def replace_route(self, dst: str, via: str | None, dev: str | None) -> None:
        spec: dict[str, Any] = {"dst": dst, "proto": RTPROT_LABCTL, "table": ROUTE_TABLE_MAIN}
        if via:
            spec["gateway"] = via
        if dev:
            spec["oif"] = self.index[dev]
        if ipaddress.ip_network(dst).version == 6:
            spec["family"] = 10
        try:
            self.ipr.route("replace", **spec)
        except NetlinkError as exc:
            raise _kernel_error(f"route {dst} via {via or dev}", self.namespace, exc) from exc

    def delete_route(self, dst: str, family: int) -> None:
        spec: dict[str, Any] = {"proto": RTPROT_LABCTL, "table": ROUTE_TABLE_MAIN, "family": family}
        if dst != "default":
            spec["dst"] = dst
        else:
            spec["dst"] = "0.0.0.0/0" if family == 2 else "::/0"
        self.ipr.route("del", **spec)

    # -- offloads and queues -------------------------------------------------
    def set_features(self, name: str, wanted: dict[str, bool]) -> None:
        """ethtool -K by feature name (rx-gro, rx-gro-list, tx-tcp-segmentation...).

        GRO on a veth switches its receive side to NAPI (notes §1, claim R13).
        """
        with netns.entered(self.namespace):
            ethtool = Ethtool()
            try:
                features = ethtool.get_features(name)
                unknown = sorted(set(wanted) - set(features.features))
                if unknown:
                    raise OSError(f"{name} in {self.namespace} has no ethtool feature {', '.join(unknown)}")
                for feature, enabled in wanted.items():
                    features.features[feature].enable = enabled
                ethtool.set_features(name, features)
            finally:
                ethtool.close()

    def set_root_qdisc(self, name: str, kind: str, **params: Any) -> None:
        """Replace the root qdisc (delete first: the kernel refuses to replace across kinds)."""
        index = self.index[name]
        with contextlib.suppress(NetlinkError):
            self.ipr.tc("del", index=index, handle=0x10000)
        try:
            self.ipr.tc("add", kind, index, 0x10000, **params)
        except NetlinkError as exc:
            raise _kernel_error(f"{kind} qdisc on {name}", self.namespace, exc) from exc

    def set_rps_cpus(self, name: str, mask: str) -> None:
        """RPS is configured in sysfs only, which must be mounted from inside the namespace."""
        write_in_namespace(self.namespace, f"class/net/{name}/queues/rx-0/rps_cpus", mask)
