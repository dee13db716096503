"""/proc/net tables read from inside a namespace: AF_PACKET sockets (taps) and UDP sockets with their queues."""

from __future__ import annotations

from dataclasses import dataclass

from labctl.kernel import netns


@dataclass(frozen=True)
class PacketSocket:
    """A row of /proc/net/packet: an AF_PACKET socket that may tap a device."""

    protocol: int
    ifindex: int
    running: bool


def read_in(namespace: str, path: str) -> str:
    """A /proc/net file as seen from ``namespace`` (thread-self: the thread's namespace)."""
    with netns.entered(namespace), open(path.replace("/proc/net/", "/proc/thread-self/net/")) as f:
        return f.read()


def packet_sockets(namespace: str) -> list[PacketSocket]:
    sockets = []
    for line in read_in(namespace, "/proc/net/packet").splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6:
            sockets.append(PacketSocket(int(parts[3], 16), int(parts[4]), parts[5] == "1"))
    return sockets


@dataclass(frozen=True)
class UdpSocket:
    port: int
    rx_queue: int
    drops: int
    inode: int


def udp_sockets(namespace: str) -> dict[int, UdpSocket]:
    """Bound UDP sockets by inode, with receive-queue bytes and the socket's own drop count."""
    found: dict[int, UdpSocket] = {}
    for line in read_in(namespace, "/proc/net/udp").splitlines()[1:]:
        parts = line.split()
        if len(parts) < 13:
            continue
        port = int(parts[1].rpartition(":")[2], 16)
        rx_queue = int(parts[4].partition(":")[2], 16)
        found[int(parts[9])] = UdpSocket(port, rx_queue, int(parts[12]), int(parts[9]))
    return found


__all__ = ["PacketSocket", "UdpSocket", "packet_sockets", "read_in", "udp_sockets"]
