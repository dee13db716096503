"""The one place that says what a lab, node or interface name may be.

Names become file names under /run/labctl, namespace names under
/run/netns, interface names in the kernel and words on command lines, so a
name that is not checked is a path traversal or a split rule waiting to
happen.  Every layer (lab file model, CLI arguments, state and lock files,
``clean --lab``) calls these functions, so a name is accepted or refused the
same way everywhere.
"""

from __future__ import annotations

import re
import unicodedata

from labctl.errors import BadNameError

NAME_MAX = 32
"""Lab and node names: short enough that ``labctl-<lab>.<node>`` stays a readable netns name."""
IFNAME_MAX = 15
"""IFNAMSIZ - 1: the kernel counts bytes, not characters."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
NAMESPACE_PREFIX = "labctl-"
"""Every namespace labctl makes starts with this (kernel.netns.PREFIX is the same string)."""
SCRATCH_LAB_RE = re.compile(r"ebdiag\d+")
"""Lab part of the scratch namespaces ebtables diagnosis makes (``labctl-ebdiag<pid>.<tid>``)."""
_SCRATCH_NS_RE = re.compile(re.escape(NAMESPACE_PREFIX) + r"ebdiag(\d+)\.\d+")

FALLBACK_DEVICES = frozenset(
    {"gre0", "gretap0", "erspan0", "tunl0", "sit0", "ip6tnl0", "ip6gre0", "ip_vti0", "ip6_vti0"}
)
"""Devices the kernel makes in every namespace once a tunnel driver is loaded; they cannot be deleted,
so converge leaves them be, and a lab's own virtual interface may not take these names."""

RESERVED_IFNAMES = frozenset({"all", "default"})
"""Names the kernel gives a meaning in /proc/sys/net/*/conf/: an interface so named is unreachable there."""


def lab_name_problem(name: object) -> str | None:
    """Why ``name`` is not a lab name, or None when it is one."""
    if not isinstance(name, str):
        return f"a lab name is text, not {type(name).__name__}"
    if not _NAME_RE.fullmatch(name) or len(name) > NAME_MAX:
        return f"{shorten(name)} is not a lab name (1 to {NAME_MAX} letters, digits, - and _, not starting with - or _)"
    if SCRATCH_LAB_RE.fullmatch(name):
        return f"{name!r} is reserved: labctl names its scratch namespaces labctl-ebdiag<pid>"
    return None


def check_lab_name(name: object) -> str:
    """``name`` if it is a valid lab name; BadNameError (exit 2) otherwise."""
    problem = lab_name_problem(name)
    if problem is not None:
        raise BadNameError(problem)
    assert isinstance(name, str)
    return name


def check_node_name(name: str) -> str:
    """A node name is the second half of a namespace name: the same alphabet as a lab's."""
    if not _NAME_RE.fullmatch(name) or len(name) > NAME_MAX:
        raise BadNameError(f"{shorten(name)} is not a node name (1 to {NAME_MAX} letters, digits, - and _)")
    return name


def check_ifname(name: str) -> str:
    """An interface name the kernel accepts and that /proc/sys can tell apart from its own keys."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if not name or size > IFNAME_MAX:
        raise BadNameError(
            f"interface name {shorten(name)} must be 1 to {IFNAME_MAX} bytes (the kernel's limit; it is {size})"
        )
    if name in (".", "..") or any(c in name for c in "/: ") or has_control(name):
        raise BadNameError(f"interface name {shorten(name)} may not contain '/', ':', spaces or control characters")
    if name in RESERVED_IFNAMES:
        raise BadNameError(f"interface name {name!r} is reserved: /proc/sys/net/*/conf/{name} means every interface")
    return name


def has_control(text: str, allow_newlines: bool = False) -> bool:
    """True if ``text`` holds a control character (Unicode category Cc/Cf/Zl/Zp).

    A newline in a rule string splits it into two rules for the restore
    tools; an escape sequence in a name rewrites the user's terminal.
    """
    for char in text:
        if allow_newlines and char in "\n\t":
            continue
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            return True
    return False


def scratch_namespace_name(pid: int, tid: int) -> str:
    """A throw-away namespace of process ``pid`` (thread ``tid``): its owner is in its name."""
    return f"{NAMESPACE_PREFIX}ebdiag{pid}.{tid}"


def scratch_owner(namespace: str) -> int | None:
    """The pid that made scratch namespace ``namespace``; None when it is not a scratch namespace."""
    match = _SCRATCH_NS_RE.fullmatch(namespace)
    return int(match.group(1)) if match else None


def shorten(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error never quotes a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
