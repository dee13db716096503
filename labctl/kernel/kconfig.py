"""The running kernel's build options: what a lab may rely on being there.

From /proc/config.gz when the kernel exposes it (CONFIG_IKCONFIG_PROC, this machine's kernel), else from
/boot/config-$(uname -r), which distribution kernels ship instead (Debian's 6.1 in the VM guest).
"""

from __future__ import annotations

import functools
import gzip
import os
import platform
import re

CONFIG_GZ = "/proc/config.gz"
BOOT_CONFIG = "/boot/config-{release}"
_OPTION = re.compile(r"^\s*(CONFIG_\w+)=(.*?)\s*$", re.MULTILINE)
"""``CONFIG_X=value`` lines (``# CONFIG_Y is not set`` lines set nothing)."""


def source() -> str | None:
    """The file this kernel's options are read from, or None when it shows them nowhere."""
    if os.path.exists(CONFIG_GZ):
        return CONFIG_GZ
    boot = BOOT_CONFIG.format(release=platform.release())
    return boot if os.path.exists(boot) else None


@functools.cache
def options() -> dict[str, str] | None:
    """``CONFIG_X`` -> ``y``/``m``/value for every option set; None when the kernel does not expose its config."""
    path = source()
    if path is None:
        return None
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    # one regular expression over the whole text: a Python loop over its ~8000 lines was 8 ms of `labctl validate`
    return dict(_OPTION.findall(data.decode(errors="replace")))


def missing(required: list[str]) -> list[str]:
    """The requirements this kernel does not meet; each is ``CONFIG_A`` or ``CONFIG_A|CONFIG_B`` (either).

    Built-in (``y``) and module (``m``) both count: a module is loaded on demand.
    A kernel that shows its options nowhere meets nothing it cannot show.
    """
    if not required:
        return []  # nothing asked: the config is not read (a lab without requirements never needs it)
    have = options()
    lacking = []
    for requirement in required:
        alternatives = requirement.split("|")
        if have is None or not any(have.get(opt) in ("y", "m") for opt in alternatives):
            lacking.append(requirement)
    return lacking


def as_modules(required: list[str]) -> list[str]:
    """The options among ``required`` that this kernel has as modules (``m``): they may need loading."""
    have = options() or {}
    return [opt for requirement in required for opt in requirement.split("|") if have.get(opt) == "m"]
