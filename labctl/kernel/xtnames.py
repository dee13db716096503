"""Which legacy xtables tables exist in the calling thread's namespace: ``/proc/net/ip{,6}_tables_names``.

Reading these files creates no table (opening one with libiptc does, and registers its hooks), and this
module imports nothing of python-iptables (0.15-0.5 s): a converging ``up`` reads them in every node, and
the hook tracer asks only whether a node has any table before it loads libiptc for it.
"""

from __future__ import annotations

import os

NAMES_FILES: dict[str, str] = {"ip": "ip_tables_names", "ip6": "ip6_tables_names"}
"""Per family, the file under the namespace's /proc net directory that lists its instantiated tables."""
PROC_NET = "/proc/thread-self/net"


def table_names_here(family: str = "ip") -> set[str]:
    """The tables of ``family`` instantiated in the thread's namespace (none: the family has no table yet)."""
    try:
        with open(os.path.join(PROC_NET, NAMES_FILES[family])) as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


def families_with_tables_here() -> tuple[bool, bool]:
    """Whether the thread's namespace has any IPv4 table, and any IPv6 table.

    Both files read through one open of the /proc net directory, with plain reads: a third of the cost of
    two ``open()`` calls (a thousand nodes on a converge: 0.1 s -> 0.05 s).
    """
    try:
        dir_fd = os.open(PROC_NET, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, False
    try:
        return _lists_any(dir_fd, NAMES_FILES["ip"]), _lists_any(dir_fd, NAMES_FILES["ip6"])
    finally:
        os.close(dir_fd)


def _lists_any(dir_fd: int, name: str) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        return bool(os.read(fd, 4096).split())
    finally:
        os.close(fd)
