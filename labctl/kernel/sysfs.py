"""sysfs as seen from a lab namespace.

``/sys/class/net`` shows the devices of the namespace that mounted sysfs, so
a write to a lab device's sysfs file (RPS masks) happens in a short-lived
child that enters the namespace, unshares its mount namespace and mounts a
fresh sysfs there -- what ``ip netns exec`` does -- leaving the host's
mounts untouched.
"""

from __future__ import annotations

import os

from labctl.kernel import netns
from labctl.kernel.netns import LIBC, check_call

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2


def enter_with_own_sysfs(namespace: str) -> None:
    """Move this process into ``namespace`` with a sysfs of its own (irreversible).

    Only for a child process or right before ``exec``: the mount namespace is
    unshared for the whole process.
    """
    fd = os.open(netns.path(namespace), os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.setns_fd(fd)
    finally:
        os.close(fd)
    check_call(LIBC.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check_call(LIBC.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount")
    LIBC.umount2(b"/sys", MNT_DETACH)
    check_call(LIBC.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "mount sysfs")


def write_in_namespace(namespace: str, relative: str, value: str) -> None:
    """Write ``value`` to ``/sys/<relative>`` as seen from inside ``namespace``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_end)
        status = 0
        try:
            enter_with_own_sysfs(namespace)
            with open(os.path.join("/sys", relative), "w") as f:
                f.write(value)
        except BaseException as exc:  # anything: the parent must hear of it, not read success
            os.write(write_end, f"{getattr(exc, 'strerror', None) or exc!r}".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise OSError(f"writing {value!r} to /sys/{relative} in {namespace}: {message}")
