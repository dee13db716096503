"""AF_PACKET sockets inside a node's network namespace: opening, binding, naming devices.

A packet socket is the kernel's own tap on a device: ``dev_queue_xmit_nit``
hands it every outgoing frame after the qdisc, ``__netif_receive_skb`` every
incoming one before the IP layer.  It is opened inside the namespace, so it
sees only that node's devices and its ioctls resolve names there.  What is
done with it is elsewhere: :mod:`labctl.kernel.capture` reads frames through
a TPACKET_V3 ring, :mod:`labctl.kernel.inject` sends them with ``sendmmsg``,
and :mod:`labctl.kernel.frames` holds what a capture yields.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from labctl.kernel import netns

# <linux/if_ether.h>, <linux/if_packet.h>, <linux/sockios.h>
ETH_P_ALL = 0x0003
SOL_PACKET = 263
SIOCGIFNAME = 0x8910
SIOCGIFINDEX = 0x8933


def _ifindex(sock: socket.socket, ifname: str) -> int:
    """Index of ``ifname`` in the *socket's* namespace (ioctls resolve there)."""
    try:
        reply = fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, struct.pack("16si", ifname.encode(), 0))
    except OSError as exc:
        raise OSError(exc.errno, f"no interface {ifname!r}") from exc
    return int(struct.unpack("16si", reply)[1])


def _ifname(sock: socket.socket, ifindex: int) -> str:
    try:
        reply = fcntl.ioctl(sock.fileno(), SIOCGIFNAME, struct.pack("16si", b"", ifindex))
    except OSError:
        return f"if{ifindex}"  # the device went away since the frame was queued
    return struct.unpack("16si", reply)[0].split(b"\0", 1)[0].decode()


_libc = netns.LIBC  # the process's own libc: find_library("c") runs ldconfig -p (a fork and exec)


def _bind_packet(sock: socket.socket, ifindex: int, protocol: int) -> None:
    """bind() with a raw sockaddr_ll: Python's own AF_PACKET bind cannot say ifindex 0 (= all)."""
    addr = struct.pack("HHiHBB8s", socket.AF_PACKET, socket.htons(protocol), ifindex, 0, 0, 0, b"")
    if _libc.bind(sock.fileno(), addr, len(addr)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _packet_socket(namespace: str) -> socket.socket:
    """A packet socket of that namespace, protocol 0 so it receives nothing yet."""
    with netns.entered(namespace):
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
