"""Kernel modules a lab needs (br_netfilter), loaded on demand and unloaded after.

Loading br_netfilter is a host-wide change (it creates the
``net.bridge.bridge-nf-*`` sysctls in every namespace), so like a global
sysctl it is recorded with its owner before it happens, and unloaded when
the last owner releases it -- but only if labctl was the one that loaded it.
"""

from __future__ import annotations

import os
import subprocess

from labctl.kernel.registry import STATE_DIR, locked_json

MODULES_FILE = os.path.join(STATE_DIR, "modules.json")


# What a module creates when present: built-in modules have no /sys/module entry
# unless they take parameters, and a kernel without module support has no modprobe.
PRESENCE = {"br_netfilter": "/proc/sys/net/bridge"}


def loaded(module: str) -> bool:
    return os.path.isdir(f"/sys/module/{module}") or os.path.exists(PRESENCE.get(module, "/nonexistent"))


def acquire(owner: str, module: str) -> None:
    # recorded (owner, and that labctl loads it) before modprobe runs: a crash in between is undoable
    with locked_json(MODULES_FILE) as data:
        entry = data.setdefault(module, {"loaded_by_labctl": not loaded(module), "owners": []})
        if owner not in entry["owners"]:
            entry["owners"].append(owner)
        if loaded(module):
            return
    result = subprocess.run(["modprobe", module], capture_output=True, text=True)
    if result.returncode != 0:
        release(owner)
        raise OSError(f"modprobe {module} failed: {result.stderr.strip()}")


def release(owner: str) -> list[str]:
    """Drop ``owner``; unload modules labctl loaded once nobody holds them. Returns unloaded ones."""
    unloaded = []
    with locked_json(MODULES_FILE) as data:
        for module in list(data):
            entry = data[module]
            if owner in entry["owners"]:
                entry["owners"].remove(owner)
            if not entry["owners"]:
                if entry["loaded_by_labctl"] and loaded(module):
                    subprocess.run(["modprobe", "-r", module], capture_output=True)
                    unloaded.append(module)
                del data[module]
    return unloaded


def owners() -> dict[str, list[str]]:
    with locked_json(MODULES_FILE) as data:
        return {module: list(entry["owners"]) for module, entry in data.items()}


# The module that provides a kernel option, where its name is not the option's own name in lower case
# (CONFIG_DUMMY -> dummy, CONFIG_VETH -> veth need no entry).  A distribution kernel (Debian's 6.1 in the
# VM) has these as modules; this machine's monolithic kernel has them built in or not at all.
OPTION_MODULES = {
    "CONFIG_BRIDGE_EBT_BROUTE": "ebtable_broute",
    "CONFIG_BRIDGE_EBT_T_FILTER": "ebtable_filter",
    "CONFIG_BRIDGE_EBT_T_NAT": "ebtable_nat",
    "CONFIG_BRIDGE_NF_EBTABLES": "ebtables",
    "CONFIG_BRIDGE_NETFILTER": "br_netfilter",
    "CONFIG_NFT_BRIDGE_META": "nft_meta_bridge",
    "CONFIG_VLAN_8021Q": "8021q",
    "CONFIG_NET_IPGRE": "ip_gre",
    "CONFIG_NET_IPGRE_DEMUX": "gre",
    "CONFIG_IPV6_GRE": "ip6_gre",
    "CONFIG_NET_IPIP": "ipip",
    "CONFIG_NET_VRF": "vrf",
    "CONFIG_NET_SCH_NETEM": "sch_netem",
    "CONFIG_NET_SCH_FQ_CODEL": "sch_fq_codel",
    "CONFIG_NET_SCH_HTB": "sch_htb",
    "CONFIG_NET_SCH_TBF": "sch_tbf",
    "CONFIG_NET_SCH_INGRESS": "sch_ingress",
    "CONFIG_NET_CLS_FLOWER": "cls_flower",
    "CONFIG_NET_CLS_U32": "cls_u32",
    "CONFIG_NET_CLS_BPF": "cls_bpf",
    "CONFIG_NET_ACT_GACT": "act_gact",
    "CONFIG_NET_ACT_MIRRED": "act_mirred",
    "CONFIG_NET_ACT_VLAN": "act_vlan",
}


def module_for(option: str) -> str | None:
    """The module that provides ``option`` on this kernel, if modprobe knows one by that name."""
    name = OPTION_MODULES.get(option) or option.removeprefix("CONFIG_").lower()
    known = subprocess.run(["modprobe", "--dry-run", "--quiet", name], capture_output=True)
    return name if known.returncode == 0 else None


def acquire_for_options(owner: str, options: list[str]) -> None:
    """Load the modules behind kernel options a check requires (the kernel has them as ``m``).

    Most are loaded by the kernel on first use anyway (a bond link, a netem qdisc); some are not -- a
    table of legacy ebtables must exist before its rules' counters are read, and a module's tracepoints
    and counters must exist before the check is validated and judged.
    """
    for option in options:
        module = module_for(option)
        if module is not None:
            acquire(owner, module)
