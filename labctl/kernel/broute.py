"""Whether legacy ebtables' broute table can be used on this machine, without importing the rule code.

:mod:`labctl.kernel.ebtables` imports :mod:`labctl.kernel.iptables` and with it python-iptables, whose
import costs 0.1-0.4 s of CPU (and runs ``ldconfig`` to find its libraries).  Load-time validation
(:func:`labctl.lab.facts.machine_facts`) asks only this question, for every lab file with checks.
"""

from __future__ import annotations

LEGACY = "ebtables-legacy"
"""Legacy ebtables (Debian's ``ebtables`` package): the only way to the broute table (see ebtables.py)."""


def broute_available() -> bool:
    """The kernel has the legacy broute table and ebtables-legacy is installed."""
    import shutil

    from labctl.kernel import kconfig

    return not kconfig.missing(["CONFIG_BRIDGE_EBT_BROUTE"]) and shutil.which(LEGACY) is not None
