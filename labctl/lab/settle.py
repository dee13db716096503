"""The build's last step: return only once the lab carries traffic (links up, IPv6 addresses past DAD)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from labctl.errors import KernelError

if TYPE_CHECKING:
    from labctl.lab.builder import Builder


def settle(builder: Builder) -> set[str]:
    """Return only once every link that should be up carries traffic; the nodes whose interfaces were read
    (their handles' name -> index caches are the kernel's as of now)."""
    read = set()
    for node, handle in builder.handles.items():
        spec = builder.topo.nodes[node]
        wanted = {
            name
            for name in builder.wanted_interfaces[node] - {"lo"} - set(spec.bridges)
            if (cfg := spec.interfaces.get(name)) is None or cfg.up
        }
        if wanted:
            handle.wait_operational(wanted)
            read.add(node)
    for handle in list(builder.handles.values())[-1:]:
        handle.sync()
    settle_ipv6(builder)
    return read


def settle_ipv6(builder: Builder) -> None:
    """Return once no IPv6 address of an IPv6 node is tentative (DAD takes about a second).

    A tentative address is not usable: a datagram to it is dropped and it is never chosen as a
    source, so a check run right after ``up`` would see the DAD window, not the lab.  An address
    that failed DAD is a duplicate on the link: an error naming it.
    """
    for node, handle in builder.handles.items():
        if not builder.topo.nodes[node].ipv6:
            continue
        tentative, failed = handle.wait_ipv6_settled()
        if failed or tentative:
            raise KernelError(
                f"node {node}: IPv6 "
                + (f"duplicate address detection failed for {', '.join(failed)}" if failed else
                   f"addresses still tentative after 10 s: {', '.join(tentative)}")
            )
