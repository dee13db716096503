"""Offloads and receive queues of a node's interfaces: ethtool features and RPS CPUs.

Rare and intricate, so done through pyroute2's ethtool (imported on first
use) and the namespace's own sysfs, not raw netlink: GRO on a veth switches
its receive side to NAPI, which some claims are about.
"""

from __future__ import annotations

from typing import Any

from labctl.kernel import netns
from labctl.kernel.nodenetlink import NodeNetlink


class NodeOffloads(NodeNetlink):
    """ethtool features and RPS of one namespace's interfaces (a mixin of :class:`NodeLinks`)."""

    def set_features(self, name: str, wanted: dict[str, bool]) -> None:
        """ethtool -K by feature name (rx-gro, rx-gro-list, tx-tcp-segmentation...).

        GRO on a veth switches its receive side to NAPI (notes §1, claim R13).
        """
        self.commit()
        swap_features(self.namespace, name, wanted)

    def set_rps_cpus(self, name: str, mask: str) -> None:
        """RPS is configured in sysfs only, which must be mounted from inside the namespace."""
        from labctl.kernel.sysfs import write_in_namespace

        self.commit()
        write_in_namespace(self.namespace, f"class/net/{name}/queues/rx-0/rps_cpus", mask)


def feature_names() -> frozenset[str]:
    """The ethtool feature names this kernel knows (its netdev feature strings, the same for every device),
    read from ``lo`` of the calling thread's namespace -- a read, nothing changes.  Empty if unreadable."""
    from pyroute2 import Ethtool

    try:
        ethtool = Ethtool()
    except OSError:
        return frozenset()
    try:
        return frozenset(name for name in ethtool.get_features("lo").features if name)
    except OSError:
        return frozenset()
    finally:
        ethtool.close()


def swap_features(namespace: str, name: str, wanted: dict[str, bool], strict: bool = False) -> dict[str, bool]:
    """ethtool -K ``name`` in ``namespace``; returns the values the named features had (to put them back).

    A feature the device does not have is an error naming it; with ``strict``, so is one the driver did not
    change (fixed, or needing another feature first): the values are put back and the error names it.
    """
    from pyroute2 import Ethtool
    from pyroute2.ethtool.ioctl import EthtoolError

    with netns.entered(namespace):
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(name)
            unknown = sorted(set(wanted) - set(features.features))
            if unknown:
                raise OSError(f"{name} in {namespace} has no ethtool feature {', '.join(unknown)}")
            before = {feature: bool(features.features[feature].enable) for feature in wanted}
            for feature, enabled in wanted.items():
                features.features[feature].enable = enabled
            try:
                ethtool.set_features(name, features)
            except EthtoolError as exc:  # the kernel refused the request (a fixed feature): nothing to undo
                changing = sorted(f for f, on in wanted.items() if before[f] != on)
                raise OSError(
                    f"{name} in {namespace}: the driver did not change {', '.join(changing)} (fixed?)"
                ) from exc
            if not strict:
                return before
            after = ethtool.get_features(name)
            stuck = sorted(f for f, on in wanted.items() if bool(after.features[f].enable) != on)
            if stuck:
                ethtool.set_features(name, _with(after, before))
                raise OSError(f"{name} in {namespace}: the driver did not change {', '.join(stuck)} (fixed?)")
            return before
        finally:
            ethtool.close()


def _with(features: Any, values: dict[str, bool]) -> Any:
    for feature, enabled in values.items():
        features.features[feature].enable = enabled
    return features
