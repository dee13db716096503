"""Capturing frames from AF_PACKET inside a node's namespace, filtered in the kernel, through a TPACKET_V3 ring.

A capture here is *evidence*: the packet socket sees a frame where the
kernel handed it over (after the qdisc on the way out, before the IP layer
on the way in), so a frame captured and then dropped by netfilter proves
where the drop was.  :class:`Capture` attaches a BPF program compiled from
tcpdump syntax by libpcap itself, and reads through a TPACKET_V3 ring so
that bursts of hundreds of thousands of frames are queued in the kernel
without a syscall per frame.  ``PACKET_STATISTICS`` says when the ring
overflowed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from labctl.kernel import netns
from labctl.kernel.bpf import (
    DEFAULT_SNAPLEN,
    CaptureError,
    SockFilter,
    VlanFilter,
    attach_filter,
    compile_filter,
    needs_vlan_tags,
    tagged_frames_pass,
)
from labctl.kernel.frames import Frame
from labctl.kernel.packet import ETH_P_ALL, SOL_PACKET, _bind_packet, _ifindex, _ifname, _packet_socket

# <linux/if_packet.h>
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
TPACKET3_HDRLEN = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr)); sockaddr_ll follows


PACKET_TYPES = {
    0: "host",
    1: "broadcast",
    2: "multicast",
    3: "otherhost",
    4: "outgoing",
    5: "loopback",
    6: "user",
    7: "kernel",
}


@dataclass(frozen=True)
class CaptureStats:
    """PACKET_STATISTICS summed over the capture's life.

    ``packets`` counts frames that passed the filter (kernel side), including
    the ``drops`` the ring had no room for; ``frames`` is what was read.
    """

    packets: int
    drops: int
    freeze_queue: int
    frames: int

    @property
    def lost(self) -> bool:
        return self.drops > 0


@dataclass
class _Ring:
    """Geometry of the TPACKET_V3 receive ring."""

    block_size: int
    block_nr: int
    retire_ms: int

    def request(self) -> bytes:
        frame_size = 2048  # unused by V3 except for the kernel's sanity checks
        frames = self.block_size // frame_size * self.block_nr
        return struct.pack("7I", self.block_size, self.block_nr, frame_size, frames, self.retire_ms, 0, 0)


@dataclass
class Capture:
    """Frames on ``ifname`` (all devices when None) of ``namespace``, filtered in the kernel.

    The socket exists from construction on, so traffic sent afterwards is
    queued even if nobody reads yet: either ``read()`` after the traffic, or
    use the capture as a context manager (or ``start()``) to collect in a
    background thread until ``count`` frames, ``timeout`` seconds or
    ``stop()``.
    """

    namespace: str
    ifname: str | None = None
    bpf_filter: str | None = None
    count: int | None = None
    timeout: float | None = None
    ring_bytes: int = 32 << 20
    block_bytes: int = 256 << 10
    retire_ms: int = 5
    snaplen: int = DEFAULT_SNAPLEN
    _frames: list[Frame] = field(default_factory=list, init=False, repr=False)
    _blocks: list[tuple[bytes, int, int]] = field(default_factory=list, init=False, repr=False)
    _taken: int = field(default=0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _totals: list[int] = field(default_factory=lambda: [0, 0, 0], init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _names: dict[int, str] = field(default_factory=dict, init=False, repr=False)
    _block: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        program = compile_filter(self.bpf_filter, snaplen=self.snaplen) if self.bpf_filter else None
        self._vlan_filter: VlanFilter | None = None
        if program is not None and needs_vlan_tags(self.bpf_filter):
            self._vlan_filter = VlanFilter(program)
            program = tagged_frames_pass(program, self.snaplen)
        self._ring = _Ring(self.block_bytes, max(1, self.ring_bytes // self.block_bytes), self.retire_ms)
        self._sock = _packet_socket(self.namespace)
        try:
            self._setup(program)
        except BaseException:
            self._sock.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._deadline: float | None = None

    def _setup(self, program: list[SockFilter] | None) -> None:
        """Filter and ring first, bind last: no unfiltered frame can slip in."""
        sock = self._sock
        where = f"{self.ifname or 'all interfaces'} in {self.namespace}"
        try:
            if program is not None:
                attach_filter(sock, program)
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, self._ring.request())
        except OSError as exc:
            raise CaptureError(f"cannot set up the capture ring on {where} ({self._ring}): {exc.strerror}") from exc
        self._map = mmap.mmap(sock.fileno(), self._ring.block_size * self._ring.block_nr)
        try:
            ifindex = _ifindex(sock, self.ifname) if self.ifname else 0
            _bind_packet(sock, ifindex, ETH_P_ALL)
        except OSError as exc:
            self._map.close()
            raise CaptureError(f"cannot capture on {where}: {exc.strerror}") from exc

    # -- ring reading

    def _block_offset(self, index: int) -> int:
        return index * self._ring.block_size

    def _drain_ready(self) -> bool:
        """Take every block the kernel has handed over; False when count is reached."""
        while True:
            offset = self._block_offset(self._block)
            if not struct.unpack_from("I", self._map, offset + 8)[0] & TP_STATUS_USER:
                return True
            self._read_block(offset)
            struct.pack_into("I", self._map, offset + 8, TP_STATUS_KERNEL)  # give it back
            self._block = (self._block + 1) % self._ring.block_nr
            if self._count_reached():
                return False

    def _read_block(self, offset: int) -> None:
        """Copy the block out of the ring in one slice; frames are parsed when asked for.

        Parsing in Python costs about a microsecond per frame; doing it here
        would hold the GIL in the reader thread and slow down whatever else the
        process does (an Injector, typically) while the burst is running.
        """
        num_pkts, first, used = struct.unpack_from("III", self._map, offset + 12)
        if self._vlan_filter is not None:
            self._read_block_vlan(offset, num_pkts, first, used)
            return
        take = num_pkts if self.count is None else min(num_pkts, self.count - self._taken)
        if take > 0:
            end = used if first < used <= self._ring.block_size else self._ring.block_size
            with self._lock:
                self._blocks.append((self._map[offset : offset + end], first, take))
                self._taken += take

    def _read_block_vlan(self, offset: int, num_pkts: int, first: int, used: int) -> None:
        """Parse now, and keep a frame whose tag was in metadata only if the filter matches it re-tagged.

        Frames without such a tag already passed the whole filter in the kernel.
        Parsing here (not lazily) lets ``count`` count matching frames only.
        """
        assert self._vlan_filter is not None
        end = used if first < used <= self._ring.block_size else self._ring.block_size
        block = self._map[offset : offset + end]
        pos, kept = first, []
        for _ in range(num_pkts):
            if self._count_reached():
                break
            status = struct.unpack_from("I", block, pos + 20)[0]
            frame = self._parse(block, pos)
            pos += struct.unpack_from("I", block, pos)[0]  # tp_next_offset
            if status & TP_STATUS_VLAN_VALID and not self._vlan_filter.matches(frame.data, frame.wire_len):
                continue
            kept.append(frame)
            self._taken += 1
        with self._lock:
            self._frames.extend(kept)

    def _parse_pending(self) -> None:
        with self._lock:
            blocks, self._blocks = self._blocks, []
        for data, first, take in blocks:
            pos = first
            for _ in range(take):
                self._frames.append(self._parse(data, pos))
                pos += struct.unpack_from("I", data, pos)[0]  # tp_next_offset

    def _parse(self, block: bytes, pos: int) -> Frame:
        _, sec, nsec, snaplen, wire_len, status, mac = struct.unpack_from("IIIIIIH", block, pos)
        ifindex, _, pkttype = struct.unpack_from("iHB", block, pos + TPACKET3_HDRLEN + 4)
        data = block[pos + mac : pos + mac + snaplen]
        if status & TP_STATUS_VLAN_VALID:
            data, wire_len = _reinsert_vlan(block, pos, status, data), wire_len + 4
        kind = PACKET_TYPES.get(pkttype, str(pkttype))
        return Frame(sec * 1_000_000_000 + nsec, self._name(ifindex), kind, data, wire_len)

    def _name(self, ifindex: int) -> str:
        name = self._names.get(ifindex)
        if name is None:
            name = self._names[ifindex] = _ifname(self._sock, ifindex)
        return name

    def _remember_interfaces(self) -> None:
        """Names are looked up through the socket; keep the table for frames decoded after close."""
        with contextlib.suppress(netns.NamespaceError, OSError), netns.entered(self.namespace):
            for index, name in socket.if_nameindex():
                self._names.setdefault(index, name)

    def _count_reached(self) -> bool:
        return self.count is not None and self._taken >= self.count

    def _pending_in_open_block(self) -> bool:
        """The block the kernel is filling already holds frames (retired within retire_ms)."""
        offset = self._block_offset(self._block)
        return bool(struct.unpack_from("I", self._map, offset + 12)[0])

    def _wait_ready(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        events = poller.poll(max(0.0, timeout) * 1000)
        return any(fd == self._sock.fileno() for fd, _ in events)

    def _settle(self) -> None:
        """Collect frames still sitting in the open block (the kernel retires it soon)."""
        limit = time.monotonic() + max(0.05, 4 * self.retire_ms / 1000)
        while self._drain_ready() and self._pending_in_open_block() and time.monotonic() < limit:
            time.sleep(self.retire_ms / 2000)

    # -- public API

    def read(self, count: int | None = None, timeout: float = 0.0) -> list[Frame]:
        """Frames queued so far (including a partly filled block), returned and kept.

        With ``count``, keep waiting up to ``timeout`` seconds until that many
        new frames have arrived.
        """
        if self._running():
            raise CaptureError("capture is running in the background; call stop()")
        start = len(self.frames)
        target = self._taken + count if count is not None else 0
        deadline = time.monotonic() + timeout
        while self._drain_ready() and self._taken < target and time.monotonic() < deadline:
            self._wait_ready(min(deadline - time.monotonic(), self.retire_ms / 1000 * 2))
        self._settle()
        return self.frames[start:]

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Capture:
        """Collect in a background thread until count, ``timeout`` seconds from now, or :meth:`stop`."""
        if not self._running():
            self._stop.clear()
            self._deadline = time.monotonic() + self.timeout if self.timeout is not None else None
            self._thread = threading.Thread(target=self._run, name=f"capture-{self.namespace}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self._drain_ready():
            remaining = 0.2 if self._deadline is None else self._deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wait_ready(min(remaining, 0.2))
        if not self._count_reached():
            self._settle()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background capture ended by count or timeout."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> list[Frame]:
        """End background collection (after taking what is queued) and return all frames."""
        if self._thread is not None:
            self._stop.set()
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
            os.read(self._wake_r, 1)
        return self.frames

    @property
    def frames(self) -> list[Frame]:
        """Every frame taken so far (decoding whatever blocks were copied since last asked)."""
        self._parse_pending()
        return list(self._frames)

    def stats(self) -> CaptureStats:
        """Kernel counters; the kernel resets them on each read, so they are summed here."""
        if self._sock.fileno() >= 0:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
            for i, value in enumerate(struct.unpack("III", raw)):
                self._totals[i] += value
        packets, drops, freeze = self._totals
        return CaptureStats(packets, drops, freeze, self._taken)

    def write_pcap(self, path: str | os.PathLike[str], node: str | None = None, comment: Any = None) -> int:
        """pcapng for ``.pcapng`` (IDBs ``node:iface``, a comment per frame; ``comment`` adds a verdict), else pcap."""
        from labctl.kernel import pcap

        who = node or self.namespace
        return pcap.write(path, self.frames, node=who, namespace=self.namespace, snaplen=self.snaplen, comment=comment)

    def close(self) -> None:
        """Stop, keep the final statistics, release the ring and the socket."""
        if self._sock.fileno() < 0:
            return
        self.stop()
        self.stats()
        self._remember_interfaces()
        self._map.close()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reinsert_vlan(block: bytes, pos: int, status: int, data: bytes) -> bytes:
    """Put back the 802.1Q tag the device's VLAN offload moved into metadata (as libpcap does)."""
    tci, tpid = struct.unpack_from("IH", block, pos + 32)
    if not status & TP_STATUS_VLAN_TPID_VALID:
        tpid = 0x8100
    return data[:12] + struct.pack("!HH", tpid, tci & 0xFFFF) + data[12:]
