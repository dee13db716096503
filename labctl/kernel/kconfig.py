"""The running kernel's build options, from /proc/config.gz: what a lab may rely on being there."""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Iterable

CONFIG_GZ = "/proc/config.gz"


def _boot_config() -> str:
    """Where distributions (Debian's kernels have no /proc/config.gz) keep the running kernel's config."""
    return f"/boot/config-{os.uname().release}"


@functools.cache
def options() -> dict[str, str] | None:
    """``CONFIG_X`` -> ``y``/``m``/value for every option set; None when the kernel does not expose its config.

    /proc/config.gz first (it is the running kernel's own); else /boot/config-$(uname -r).
    """
    if os.path.exists(CONFIG_GZ):
        with gzip.open(CONFIG_GZ, "rt") as f:
            return _parse(f)
    if os.path.exists(_boot_config()):
        with open(_boot_config()) as f:
            return _parse(f)
    return None


def _parse(lines: Iterable[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.strip().partition("=")
        if sep and name.startswith("CONFIG_"):
            found[name] = value
    return found


def missing(required: list[str]) -> list[str]:
    """The requirements this kernel does not meet; each is ``CONFIG_A`` or ``CONFIG_A|CONFIG_B`` (either).

    Built-in (``y``) and module (``m``) both count: a module is loaded on demand.
    A kernel without /proc/config.gz meets nothing it cannot show.
    """
    have = options()
    lacking = []
    for requirement in required:
        alternatives = requirement.split("|")
        if have is None or not any(have.get(opt) in ("y", "m") for opt in alternatives):
            lacking.append(requirement)
    return lacking
