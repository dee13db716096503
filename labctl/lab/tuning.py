"""The build's settings steps once the devices exist: br_netfilter, sysctls, device features and RPS, and tc."""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.kernel import modules, sysctl
from labctl.lab import tc
from labctl.lab.teardown import owner

if TYPE_CHECKING:
    from labctl.lab.builder import Builder


def kernel_modules(builder: Builder) -> None:
    """br_netfilter only when a node sets bridge-nf sysctls or a bridge its nf_call_* (it changes every bridge)."""
    nodes = builder.topo.nodes.values()
    sysctls = any(key.startswith("net.bridge.") for spec in nodes for key in spec.sysctls)
    # a bridge's own nf_call_* switch does nothing until br_netfilter's hooks exist
    nf_call = any(
        c.nf_call_iptables or c.nf_call_ip6tables or c.nf_call_arptables for s in nodes for c in s.bridges.values()
    )
    if sysctls or nf_call:
        modules.acquire(owner(builder.lab), "br_netfilter")


def knobs(builder: Builder) -> None:
    for node, spec in builder.topo.nodes.items():
        if spec.sysctls:
            sysctl.write_many({k: sysctl.format_value(v) for k, v in spec.sysctls.items()}, builder.ns[node])
        for ifname, cfg in spec.interfaces.items():
            features = dict(cfg.features)
            if cfg.gro is not None:
                features["rx-gro"] = cfg.gro
            if features:
                builder.handles[node].set_features(ifname, features)
            if cfg.rps_cpus is not None:
                builder.handles[node].set_rps_cpus(ifname, cfg.rps_cpus)


def traffic_control(builder: Builder, before: dict[str, str]) -> dict[str, str]:
    """Each interface's tc (labctl.lab.tc); returns the fingerprints to remember in the state."""
    built: dict[str, str] = {}
    for node, spec in builder.topo.nodes.items():
        handle = builder.handles[node]
        handle.commit()
        names = {i for i in spec.interfaces if spec.interfaces[i].traffic_control is not None}
        names |= {key.partition(":")[2] for key in before if key.partition(":")[0] == node}
        for ifname in sorted(names):
            key = f"{node}:{ifname}"
            cfg = spec.interfaces.get(ifname)
            if ifname not in handle.index and cfg is None:
                continue  # the interface itself is gone
            done, mark = tc.converge(
                handle, ifname, cfg.traffic_control if cfg else None, before.get(key), node in builder.fresh
            )
            if done is not None:
                builder.traffic_changes.append(f"{key}: tc {done}")
            if mark is not None:
                built[key] = mark
    return built
