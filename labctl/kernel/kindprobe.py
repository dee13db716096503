"""Which link kinds this kernel can make, asked of the kernel itself in a throw-away namespace.

For kernels that publish no config (no /proc/config.gz, no /boot/config-*)
the lab layer cannot read which drivers are built; rtnetlink tells instead:
creating a device of an unknown kind fails with EOPNOTSUPP ("Unknown device
type", after the kernel tried to load its module).  The probe runs in
``unshare --net`` -- a namespace without a name, gone when the probe process
exits -- so nothing is ever created where anyone could see it, and nothing is
left to reclaim.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

PROBE_SCRIPT = r"""
import errno, json, sys
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
ipr = IPRoute()
def parent(n):
    ipr.link("add", ifname=f"pp{n}", kind="veth", peer=f"pq{n}")
    return ipr.link_lookup(ifname=f"pp{n}")[0]
specs = {
    "vlan": lambda n: dict(kind="vlan", link=parent(n), vlan_id=2),
    "macvlan": lambda n: dict(kind="macvlan", link=parent(n), macvlan_mode="bridge"),
    "ipvlan": lambda n: dict(kind="ipvlan", link=parent(n), ipvlan_mode=1),
    "vxlan": lambda n: dict(kind="vxlan", vxlan_id=1, vxlan_port=4789),
    "dummy": lambda n: dict(kind="dummy"),
    "bond": lambda n: dict(kind="bond"),
    "vrf": lambda n: dict(kind="vrf", vrf_table=100),
    "gre": lambda n: dict(kind="gre", gre_local="192.0.2.1", gre_remote="192.0.2.2"),
    "ipip": lambda n: dict(kind="ipip", ipip_local="192.0.2.1", ipip_remote="192.0.2.2"),
    "bridge_vlan_filtering": lambda n: dict(kind="bridge", br_vlan_filtering=1),
}
found = {}
for n, kind in enumerate(sys.argv[1:]):
    try:
        ipr.link("add", ifname=f"probe{n}", **specs[kind](n))
        found[kind] = True
    except NetlinkError as exc:
        found[kind] = exc.code != errno.EOPNOTSUPP
print(json.dumps(found))
"""

PROBES = ("vlan", "macvlan", "ipvlan", "vxlan", "dummy", "bond", "vrf", "gre", "ipip", "bridge_vlan_filtering")
"""What the probe can ask: the virtual kinds, and a bridge that filters VLANs."""


def probe(kinds: list[str]) -> dict[str, bool] | None:
    """kind -> whether this kernel makes it; None when the probe cannot run (not root, no unshare)."""
    kinds = [kind for kind in dict.fromkeys(kinds) if kind in PROBES]
    unshare = shutil.which("unshare")
    if not kinds or unshare is None or os.geteuid() != 0:
        return None
    try:
        done = subprocess.run(
            [unshare, "--net", "--", sys.executable, "-c", PROBE_SCRIPT, *kinds],
            capture_output=True,
            text=True,
            timeout=30,
        )
        answer = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    if not isinstance(answer, dict) or set(answer) != set(kinds):
        return None
    return {kind: bool(answer[kind]) for kind in kinds}
