"""The build's addresses-and-routes step: each node's addresses and routes converged to the file."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labctl.lab.builder import Builder


def addresses_and_routes(builder: Builder) -> None:
    for node, spec in builder.topo.nodes.items():
        handle = builder.handles[node]
        handle.ensure_indexes({name for name, cfg in spec.interfaces.items() if cfg.addresses})
        handle.ensure_indexes({route.dev for route in spec.routes if route.dev})
        current = handle.addresses() if node not in builder.fresh else {}
        for ifname, cfg in spec.interfaces.items():
            wanted = [str(a) for a in cfg.addresses]
            have = [a for a in current.get(ifname, []) if not a.startswith("fe80:") and a != "127.0.0.1/8"]
            for cidr in wanted:
                if cidr not in have:
                    handle.add_address(ifname, cidr)
                    if node not in builder.fresh:
                        builder.changes.append(f"{node}: {ifname} address {cidr} added")
            for cidr in have:
                if cidr not in wanted and not (ifname == "lo" and cidr == "::1/128"):
                    handle.del_address(ifname, cidr)
                    builder.changes.append(f"{node}: {ifname} address {cidr} removed")
        wanted_routes = {str(r.network) for r in spec.routes}
        if node not in builder.fresh:
            for existing in handle.routes(own_only=True):
                dst = existing["dst"]
                if dst == "default":
                    dst = "0.0.0.0/0" if existing["family"] == 2 else "::/0"
                if dst not in wanted_routes:
                    handle.delete_route(existing["dst"], existing["family"])
                    builder.changes.append(f"{node}: route {existing['dst']} removed")
        for route in spec.routes:
            handle.replace_route(str(route.network), str(route.via) if route.via else None, route.dev)
