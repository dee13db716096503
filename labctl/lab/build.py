"""Bring a topology up on the kernel (or converge a running lab to it), and down.

``up`` is a converge: namespaces, interfaces, addresses and routes that
already match are kept, missing ones created, stale ones removed.  Whatever
this run created is rolled back if any step fails, so a failed ``up`` leaves
nothing half-built behind.

Speed comes from doing per node what the kernel needs and no more: every
device in a namespace this run created gets its ifindex chosen here (so no
lookups), each node's changes go out as one netlink batch per step, veth
peers are born with their settings, and a converge reads each namespace's
state once.  python-iptables (0.3 s to import) is loaded only when a node
has rules or had tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labctl.errors import KernelError, LabFileError, Problem
from labctl.kernel import modules, netns, nft, sysctl
from labctl.kernel.links import PEER_ALIAS, LinkAttrs, Netlink, NodeLinks, bridge_tables_here
from labctl.kernel.sysctl import GlobalOverrides
from labctl.lab import nftables, relay, state, tc
from labctl.lab.state import LabState
from labctl.names import FALLBACK_DEVICES

if TYPE_CHECKING:  # the model costs 0.1 s to import; down never needs it
    from labctl.lab.virtual import VirtualBuilder
    from labctl.topology.model import Endpoint, Link, Topology

IPV6_OFF = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
IPV6_ON = {"net.ipv6.conf.all.disable_ipv6": "0", "net.ipv6.conf.default.disable_ipv6": "0"}
DAD_OFF = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
DAD_ON = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "1"}
"""accept_dad per node (``dad:``); 'all' stays 0 (the kernel uses the larger of all and the interface's)."""


FALLBACK_DEVICE_ROOM = 32
"""ifindexes left free for the kernel's per-namespace fallback tunnel devices (about ten exist)."""


def owner(lab: str) -> str:
    """The name under which a lab holds host-wide sysctl overrides."""
    return f"lab:{lab}"


@dataclass
class _Run:
    """What one ``up`` created, so a failure can undo exactly that."""

    namespaces: list[str] = field(default_factory=list)
    relays: list[int] = field(default_factory=list)
    globals_acquired: bool = False


class Builder:
    """Turns one topology into kernel objects through per-node netlink sockets."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.lab = topo.name
        self.ns = {node: netns.namespace_name(self.lab, node) for node in topo.nodes}
        self.handles: dict[str, NodeLinks] = {}
        self.fresh: set[str] = set()  # nodes whose namespace this run created
        self.tables: dict[str, tuple[bool, bool]] = {}  # existing node -> (has iptables, has ebtables tables)
        self.nft_tables: dict[str, list[tuple[str, str]]] = {}  # existing node -> its nf_tables tables
        self.traffic_changes: list[str] = []  # "a:eth0: tc replaced", "b: nftables loaded" (for up to print)
        self.next_index: dict[str, int] = {}
        # lookups the steps make per interface, computed once (labs have thousands of links)
        self.link_at: dict[tuple[str, str], Link] = {}
        for link in topo.links:
            for end in link.ends:
                self.link_at[(end.node, end.interface)] = link
        self.port_of: dict[tuple[str, str], str] = {
            (node, port): bridge
            for node, spec in topo.nodes.items()
            for bridge, config in spec.bridges.items()
            for port in config.ports
        }
        self.bond_members: set[tuple[str, str]] = set()
        for node, spec in topo.nodes.items():  # bond and vrf members: their master, like a bridge port's
            for name, cfg in spec.interfaces.items():
                if cfg.kind in ("bond", "vrf"):
                    for member in cfg.members:
                        self.port_of[(node, member)] = name
                        if cfg.kind == "bond":
                            self.bond_members.add((node, member))
        self.wanted_interfaces: dict[str, set[str]] = {
            node: {"lo"} | set(spec.bridges) | {n for n, cfg in spec.interfaces.items() if cfg.kind is not None}
            for node, spec in topo.nodes.items()
        }
        self.changes: list[str] = []
        """What this run changed, one line each, for ``up`` to print: virtual interfaces and bridge settings
        always; links, removed interfaces, addresses and routes on a converge (a first build makes them all)."""
        self._virtual: VirtualBuilder | None = None
        for node, ifname in self.link_at:
            self.wanted_interfaces[node].add(ifname)

    @property
    def virtual(self) -> VirtualBuilder:
        """The virtual interface and bridge-settings steps (labctl/lab/virtual.py), once the handles exist."""
        if self._virtual is None:
            from labctl.lab.virtual import VirtualBuilder

            self._virtual = VirtualBuilder(self.topo, self.handles, self.fresh)
            self._virtual.changes = self.changes
        return self._virtual

    # -- the plan's vocabulary -------------------------------------------
    def bridge_of(self, end: Endpoint) -> str | None:
        return self.port_of.get((end.node, end.interface))

    def attrs(self, node: str, ifname: str, link: Link | None = None) -> LinkAttrs:
        cfg = self.topo.nodes[node].interfaces.get(ifname)
        master = self.port_of.get((node, ifname)) if link is not None else None
        mtu = (cfg.mtu if cfg else None) or (link.mtu if link else None)
        alias = None
        if link is not None:
            far = next(end for end in link.ends if (end.node, end.interface) != (node, ifname))
            alias = f"{PEER_ALIAS}{far}"
        if cfg is None:
            return LinkAttrs(mtu=mtu, master=master, alias=alias)
        return LinkAttrs(
            mac=cfg.mac, mtu=mtu, txqueuelen=cfg.txqueuelen, promisc=cfg.promisc, up=cfg.up, master=master, alias=alias
        )

    # -- steps -----------------------------------------------------------
    def namespaces(self, run: _Run) -> None:
        for name in netns.list_labctl(self.lab):
            if name not in self.ns.values():
                netns.remove(name)  # a node that left the topology (and its veths' peers with it)
        for node, name in self.ns.items():
            if not netns.exists(name):
                netns.create(name)
                run.namespaces.append(name)
                self.fresh.add(node)
            wanted = IPV6_ON if self.topo.nodes[node].ipv6 else IPV6_OFF
            if self.topo.nodes[node].ipv6:
                wanted = {**wanted, **(DAD_ON if self.topo.nodes[node].dad else DAD_OFF)}
            with netns.entered(name):  # one switch for all of it: this runs once per node
                sysctl.write_here(wanted)  # before any link exists, so links inherit it
                self.handles[node] = handle = NodeLinks(name, Netlink(), batch=True)
                if node not in self.fresh:
                    # all/default may not reach existing interfaces: a converge sets those that differ
                    off = wanted["net.ipv6.conf.all.disable_ipv6"] == "1"
                    differ = [name for name, disabled in handle.ipv6_disabled().items() if disabled != off]
                    sysctl.write_here({f"net.ipv6.conf.{name}.disable_ipv6": "1" if off else "0" for name in differ})
                    if self.topo.nodes[node].ipv6:  # dad: applies to the interfaces that exist already too
                        dad = DAD_ON["net.ipv6.conf.default.accept_dad"] if self.topo.nodes[node].dad else "0"
                        sysctl.write_here(
                            {f"net.ipv6.conf.{name}.accept_dad": dad for name in handle.ipv6_disabled() if name != "lo"}
                        )
                    self.tables[node] = (_has_iptables_here(), bridge_tables_here())
                    self.nft_tables[node] = nft.tables_here()
            if node in self.fresh:
                handle.index = {"lo": 1}

    def remove_stale_interfaces(self) -> None:
        for node, handle in self.handles.items():
            if node in self.fresh:
                continue
            wanted = self.wanted_interfaces[node]
            for ifname in list(handle.index):
                if ifname not in wanted and ifname in handle.index and ifname not in FALLBACK_DEVICES:
                    handle.delete(ifname)
                    self.changes.append(f"{node}: removed {ifname}")
                    handle.refresh()  # deleting a veth end also removes its peer

    def commit(self) -> None:
        """Send every node's queued changes (the next step depends on them)."""
        for handle in self.handles.values():
            handle.commit()

    def bridges(self) -> None:
        for node, spec in self.topo.nodes.items():
            for bridge, config in spec.bridges.items():
                self.handles[node].add_bridge(
                    bridge,
                    self.attrs(node, bridge),
                    stp=config.stp,
                    ageing_time=config.ageing_time,
                    forward_delay=config.forward_delay,
                    index=None if bridge in self.handles[node].index else self.fresh_index(node),
                )

    def links(self) -> None:
        for link in self.topo.links:
            a, b = link.ends
            if self.topo.is_tap_link(link):
                for end in (a, b):
                    if end.interface not in self.handles[end.node].index:
                        self.handles[end.node].add_tap(end.interface)
                continue
            main, other = self.near_and_far(a, b)
            h_main, h_other = self.handles[main.node], self.handles[other.node]
            have_main, have_other = main.interface in h_main.index, other.interface in h_other.index
            if have_main and have_other:
                continue
            if have_main:
                h_main.delete(main.interface)
            if have_other:
                h_other.delete(other.interface)
            if not (main.node in self.fresh and other.node in self.fresh):  # a converge: say so
                self.changes.append(f"{main.node}: created link {main} — {other}")
            main_attrs = self.attrs(main.node, main.interface, link)
            if (main.node, main.interface) in self.bond_members:  # a bond takes only a member that is down
                main_attrs = dataclasses.replace(main_attrs, master=None)
            h_main.add_veth(
                main.interface,
                main_attrs,
                other.interface,
                self.ns[other.node],
                self.attrs(other.node, other.interface, link),
                index=self.fresh_index(main.node),
                peer_index=self.fresh_index(other.node),
            )
            if other.node in self.fresh:
                h_other.index[other.interface] = self.next_index[other.node]

    def near_and_far(self, a: Endpoint, b: Endpoint) -> tuple[Endpoint, Endpoint]:
        """Which end of a veth the request creates: a bridge port, so its master is set in the same request."""
        return (b, a) if self.bridge_of(b) and not self.bridge_of(a) else (a, b)

    def fresh_index(self, node: str) -> int | None:
        """An ifindex to ask for in a namespace this run created (None elsewhere).

        The kernel numbers other devices (bridges, taps, peers arriving from
        other nodes) from 2 upward, one by one; explicit numbers start above
        all the devices this node will ever hold, so they can never collide --
        plus room for the fallback devices a tunnel module puts in every
        namespace, old and new, when it loads (gre0, gretap0, erspan0, tunl0,
        sit0, ip6tnl0, ...: on a modular kernel a lab's GRE link loads ip_gre
        mid-build, and every later namespace starts with them).
        """
        if node not in self.fresh:
            return None
        start = 2 + len(self.wanted_interfaces[node]) + FALLBACK_DEVICE_ROOM
        self.next_index[node] = self.next_index.get(node, start) + 1
        return self.next_index[node]

    def configure(self) -> None:
        for node, handle in self.handles.items():
            if node not in self.fresh:
                handle.ensure_indexes(self.wanted_interfaces[node])  # a dump only if this run made some
            for ifname in self.lower_first(node):
                if ifname in self.topo.nodes[node].bridges:
                    continue
                link = self.link_at.get((node, ifname))
                attrs = self.attrs(node, ifname, link) if ifname != "lo" else LinkAttrs()
                if node not in self.fresh and link is not None:
                    attrs = dataclasses.replace(attrs, detach=True)  # a port taken off a bridge's list
                handle.configure(ifname, attrs)

    def lower_first(self, node: str) -> list[str]:
        """The node's interfaces, each after the one it sits on: an 802.1Q device cannot be set up while its
        parent is down (ENETDOWN), so a vlan, macvlan or vxlan is configured after its parent or underlay."""
        spec = self.topo.nodes[node]
        wanted = self.wanted_interfaces[node]

        def lower(ifname: str) -> str | None:
            cfg = spec.interfaces.get(ifname)
            if cfg is None or cfg.kind is None:
                return None
            return cfg.vlan_parent_and_id(ifname)[0] if cfg.kind == "vlan" else cfg.underlay()

        def depth(ifname: str) -> int:
            seen = {ifname}
            low = lower(ifname)
            while low is not None and low in wanted and low not in seen:
                seen.add(low)
                low = lower(low)
            return len(seen) - 1

        return sorted(wanted, key=lambda name: (depth(name), name))

    def addresses_and_routes(self) -> None:
        for node, spec in self.topo.nodes.items():
            handle = self.handles[node]
            handle.ensure_indexes({name for name, cfg in spec.interfaces.items() if cfg.addresses})
            handle.ensure_indexes({route.dev for route in spec.routes if route.dev})
            current = handle.addresses() if node not in self.fresh else {}
            for ifname, cfg in spec.interfaces.items():
                wanted = [str(a) for a in cfg.addresses]
                have = [a for a in current.get(ifname, []) if not a.startswith("fe80:") and a != "127.0.0.1/8"]
                for cidr in wanted:
                    if cidr not in have:
                        handle.add_address(ifname, cidr)
                        if node not in self.fresh:
                            self.changes.append(f"{node}: {ifname} address {cidr} added")
                for cidr in have:
                    if cidr not in wanted and not (ifname == "lo" and cidr == "::1/128"):
                        handle.del_address(ifname, cidr)
                        self.changes.append(f"{node}: {ifname} address {cidr} removed")
            wanted_routes = {str(r.network) for r in spec.routes}
            if node not in self.fresh:
                for existing in handle.routes(own_only=True):
                    dst = existing["dst"]
                    if dst == "default":
                        dst = "0.0.0.0/0" if existing["family"] == 2 else "::/0"
                    if dst not in wanted_routes:
                        handle.delete_route(existing["dst"], existing["family"])
                        self.changes.append(f"{node}: route {existing['dst']} removed")
            for route in spec.routes:
                handle.replace_route(str(route.network), str(route.via) if route.via else None, route.dev)

    def netfilter(self) -> None:
        """The topology's own rules; a converge starts them from scratch (counters reset).

        A namespace without tables has nothing to flush: checked by reading
        /proc and one netlink dump, not by python-iptables and ``nft``.
        """
        for node, spec in self.topo.nodes.items():
            ns = self.ns[node]
            has_iptables, has_ebtables = self.tables.get(node, (False, False))
            if not (spec.iptables or spec.ebtables or has_iptables or has_ebtables):
                continue
            from labctl.kernel import ebtables, iptables

            if has_iptables:
                iptables.flush(ns)
            if has_ebtables:
                ebtables.flush(ns)
            if spec.iptables:
                iptables.apply_rules(ns, spec.iptables)
            if spec.ebtables:
                ebtables.apply_rules(ns, spec.ebtables)
        self.nftables()

    def nftables(self) -> None:
        """Each node's nft ruleset, converged after ebtables (whose tables it leaves alone)."""
        for node, spec in self.topo.nodes.items():
            tables = self.nft_tables.get(node, [])
            if spec.nftables is None and not tables:
                continue
            keep_ebtables = bool(spec.ebtables) or (spec.nftables is None)
            done = nftables.converge(self.ns[node], spec.nftables, tables, keep_ebtables)
            if done is not None:
                self.traffic_changes.append(f"{node}: nftables {done}")

    def kernel_modules(self) -> None:
        """br_netfilter only when a node sets bridge-nf sysctls or a bridge its nf_call_* (it changes every bridge)."""
        nodes = self.topo.nodes.values()
        sysctls = any(key.startswith("net.bridge.") for spec in nodes for key in spec.sysctls)
        # a bridge's own nf_call_* switch does nothing until br_netfilter's hooks exist
        nf_call = any(
            c.nf_call_iptables or c.nf_call_ip6tables or c.nf_call_arptables for s in nodes for c in s.bridges.values()
        )
        if sysctls or nf_call:
            modules.acquire(owner(self.lab), "br_netfilter")

    def knobs(self) -> None:
        for node, spec in self.topo.nodes.items():
            if spec.sysctls:
                sysctl.write_many({k: sysctl.format_value(v) for k, v in spec.sysctls.items()}, self.ns[node])
            for ifname, cfg in spec.interfaces.items():
                features = dict(cfg.features)
                if cfg.gro is not None:
                    features["rx-gro"] = cfg.gro
                if features:
                    self.handles[node].set_features(ifname, features)
                if cfg.rps_cpus is not None:
                    self.handles[node].set_rps_cpus(ifname, cfg.rps_cpus)

    def traffic_control(self, before: dict[str, str]) -> dict[str, str]:
        """Each interface's tc (labctl.lab.tc); returns the fingerprints to remember in the state."""
        built: dict[str, str] = {}
        for node, spec in self.topo.nodes.items():
            handle = self.handles[node]
            handle.commit()
            names = {i for i in spec.interfaces if spec.interfaces[i].traffic_control is not None}
            names |= {key.partition(":")[2] for key in before if key.partition(":")[0] == node}
            for ifname in sorted(names):
                key = f"{node}:{ifname}"
                cfg = spec.interfaces.get(ifname)
                if ifname not in handle.index and cfg is None:
                    continue  # the interface itself is gone
                done, mark = tc.converge(
                    handle, ifname, cfg.traffic_control if cfg else None, before.get(key), node in self.fresh
                )
                if done is not None:
                    self.traffic_changes.append(f"{key}: tc {done}")
                if mark is not None:
                    built[key] = mark
        return built

    def relays(self, run: _Run, previous: dict[str, int]) -> dict[str, int]:
        pids: dict[str, int] = {}
        for vm, pairs in self.relay_pairs().items():
            old = previous.get(vm)
            if old is not None and relay.alive(old, self.lab) and vm not in self.fresh:
                pids[vm] = old
                continue
            if old is not None and relay.alive(old, self.lab):
                relay.stop([old])  # never a pid the kernel may have given to another process
            pids[vm] = relay.start(self.lab, vm, pairs)
            run.relays.append(pids[vm])
        stale = [pid for pid, (_, vm) in relay.find(self.lab).items() if pids.get(vm) != pid]
        relay.stop(stale)
        return pids

    def relay_pairs(self) -> dict[str, list[tuple[str, str, str, str]]]:
        """Each tap link is served by the relay of its (first) VM end."""
        pairs: dict[str, list[tuple[str, str, str, str]]] = {}
        for link in self.topo.links:
            if not self.topo.is_tap_link(link):
                continue
            a, b = link.ends
            vm_end, other = (a, b) if self.topo.nodes[a.node].kind == "vm" else (b, a)
            pairs.setdefault(vm_end.node, []).append(
                (self.ns[vm_end.node], vm_end.interface, self.ns[other.node], other.interface)
            )
        return pairs

    def settle(self) -> None:
        """Return only once every link that should be up carries traffic."""
        for node, handle in self.handles.items():
            spec = self.topo.nodes[node]
            wanted = {
                name
                for name in self.wanted_interfaces[node] - {"lo"} - set(spec.bridges)
                if (cfg := spec.interfaces.get(name)) is None or cfg.up
            }
            if wanted:
                handle.wait_operational(wanted)
        for handle in list(self.handles.values())[-1:]:
            handle.sync()
        self.settle_ipv6()

    def settle_ipv6(self) -> None:
        """Return once no IPv6 address of an IPv6 node is tentative (DAD takes about a second).

        A tentative address is not usable: a datagram to it is dropped and it is never chosen as a
        source, so a check run right after ``up`` would see the DAD window, not the lab.  An address
        that failed DAD is a duplicate on the link: an error naming it.
        """
        for node, handle in self.handles.items():
            if not self.topo.nodes[node].ipv6:
                continue
            tentative, failed = handle.wait_ipv6_settled()
            if failed or tentative:
                raise KernelError(
                    f"node {node}: IPv6 "
                    + (f"duplicate address detection failed for {', '.join(failed)}" if failed else
                       f"addresses still tentative after 10 s: {', '.join(tentative)}")
                )

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def up(
    topo: Topology,
    file: str,
    progress: Callable[[str, int, int], None] | None = None,
    changes: list[str] | None = None,
) -> LabState:
    """Build or converge ``topo``; on failure undo what this call created and re-raise.

    ``changes``, when given, receives a line per object this run created,
    replaced, set or removed -- virtual interfaces, bridge settings, links,
    addresses, routes, tc trees and nft rulesets (``up`` prints them; a second
    ``up`` of the same file leaves it empty).

    A lab up from another file is refused (LabFileError, exit 2): its name is
    taken, and converging would silently rebuild someone else's lab.
    ``progress(step, done, total)`` is told as each step starts (the CLI draws it).
    """
    steps = iter(range(BUILD_STEPS))

    def tick(name: str) -> None:
        if progress is not None:
            progress(name, next(steps), BUILD_STEPS)

    with state.locked(topo.name):
        previous = state.load(topo.name)
        if previous is not None and previous.file != os.path.abspath(file):
            raise LabFileError(
                [
                    Problem(
                        ("name",),
                        f"lab {topo.name} is already up from {previous.file}; converging it to this file would"
                        f" change someone else's lab: bring it down first (labctl down {topo.name}) or give"
                        " this file another name",
                        file,
                    )
                ]
            )
        builder = Builder(topo)
        current = LabState(
            name=topo.name,
            file=os.path.abspath(file),
            status="building",
            nodes=dict(builder.ns),
            relays=previous.relays if previous else {},
            digest=state.digest(topo),
            interfaces={node: sorted(names) for node, names in builder.wanted_interfaces.items()},
        )
        state.save(current)  # written first: a kill -9 from here on is still cleanable
        run = _Run()
        try:
            if topo.sysctls or previous is not None:
                # converge, not release-then-acquire: a value kept is never written back and forth
                GlobalOverrides.converge(owner(topo.name), dict(topo.sysctls))
                run.globals_acquired = bool(topo.sysctls)
            tick("namespaces")
            builder.namespaces(run)
            builder.remove_stale_interfaces()
            tick("bridges")
            builder.bridges()
            builder.virtual.masters()
            tick("links")
            builder.links()
            builder.commit()
            tick("interfaces")
            builder.virtual.interfaces()
            builder.configure()
            tick("addresses and routes")
            builder.addresses_and_routes()
            builder.commit()
            builder.virtual.bridges()
            tick("sysctls, modules, knobs")
            builder.kernel_modules()
            builder.knobs()
            tick("traffic control")
            current.tc = builder.traffic_control(previous.tc if previous else {})
            tick("netfilter")
            builder.netfilter()
            tick("relays")
            current.relays = builder.relays(run, current.relays)
            tick("waiting for links to come up")
            builder.settle()
        except BaseException as exc:
            _rollback(run, topo.name, first_up=previous is None)
            if previous is None:
                state.forget(topo.name)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            undone = (
                "rolled back what this run created"
                if previous is None
                else "the lab is partly converged: run up again, or down"
            )
            detail = (
                str(exc)
                if isinstance(exc, OSError | sysctl.SysctlError | nft.NftError) or _is_rule_error(exc)
                else repr(exc)
            )
            raise KernelError(f"lab {topo.name}: {detail}; {undone}") from exc
        finally:
            builder.close()
            if changes is not None:
                changes.extend(builder.changes)
        current.status = "up"
        state.save(current)
        if changes is not None:
            changes.extend(builder.traffic_changes)
        return current


BUILD_STEPS = 10
"""Steps ``up`` reports to its progress callback."""


def _has_iptables_here() -> bool:
    """Whether the thread's namespace has any legacy xtables table (else there is nothing to flush)."""
    try:
        with open("/proc/thread-self/net/ip_tables_names") as f:
            return bool(f.read().split())
    except FileNotFoundError:
        return False


def _is_rule_error(exc: BaseException) -> bool:
    """A rule the kernel refused (python-iptables is loaded only if rules were applied)."""
    iptables = sys.modules.get("labctl.kernel.iptables")
    return iptables is not None and isinstance(exc, iptables.RuleError)


def _rollback(run: _Run, lab: str, first_up: bool) -> None:
    relay.stop(run.relays)
    for name in reversed(run.namespaces):
        with contextlib.suppress(OSError):
            netns.remove(name)
    if first_up:
        GlobalOverrides.release(owner(lab))
        modules.release(owner(lab))


def down(lab: str) -> list[str]:
    """Remove everything of ``lab`` -- by name, so it works without (or with stale) state."""
    with state.locked(lab):
        relay.stop(list(relay.find(lab)))
        removed = netns.list_labctl(lab)
        for name in removed:
            netns.remove(name)
        GlobalOverrides.release(owner(lab))
        modules.release(owner(lab))
        state.forget(lab)
        return removed
