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
