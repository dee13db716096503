"""Capture files: classic pcap (``.pcap``) and pcapng with per-packet comments (``.pcapng``).

pcapng is what Wireshark and tshark show best: one Interface Description
Block per ``node:iface`` -- named so, with the namespace in its description,
as retis names its interfaces -- and one Enhanced Packet Block per frame
with its direction in ``epb_flags`` and a comment saying where the kernel
saw it (node, interface, in/out, packet type) and, when the capture ran
under the evidence engine, the verdict (``tshark -r f.pcapng -T fields -e
frame.comment``).  Classic pcap stays for ``.pcap``: every tool reads it.

Written with :mod:`struct` from the pcapng specification (draft-ietf-opsawg-
pcapng): three block types, no library needed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from labctl.kernel.frames import Frame

DLT_EN10MB = 1
DEFAULT_SNAPLEN = 262144
PCAP_MAGIC_NS = 0xA1B23C4D

# pcapng block types and option codes
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9
_EPB_FLAGS = 2
_EPB_INBOUND, _EPB_OUTBOUND = 0b01, 0b10


@dataclass(frozen=True)
class Interface:
    """Where frames were captured: one pcapng Interface Description Block each."""

    node: str
    ifname: str
    namespace: str

    @property
    def name(self) -> str:
        return f"{self.node}:{self.ifname}"


Comment = Callable[["Frame"], str | None]
"""Extra words for one frame's comment (a verdict), or None."""


def is_pcapng(path: str | os.PathLike[str]) -> bool:
    """The format a capture file gets: pcapng for ``.pcapng``/``.ntar``, classic pcap otherwise."""
    return os.fspath(path).lower().endswith((".pcapng", ".ntar"))


def write(
    path: str | os.PathLike[str],
    frames: Iterable[Frame],
    *,
    node: str,
    namespace: str,
    snaplen: int = DEFAULT_SNAPLEN,
    comment: Comment | None = None,
) -> int:
    """Write ``frames`` as pcapng or pcap, chosen by the file name; returns how many were written."""
    if is_pcapng(path):
        return write_pcapng(path, frames, node=node, namespace=namespace, snaplen=snaplen, comment=comment)
    return write_pcap(path, frames, snaplen)


# ---------------------------------------------------------------- classic pcap


def write_pcap(path: str | os.PathLike[str], frames: Iterable[Frame], snaplen: int = DEFAULT_SNAPLEN) -> int:
    """Write a nanosecond pcap (linktype Ethernet) that tcpdump, tshark and Scapy read."""
    count = 0
    with open(path, "wb") as out:
        out.write(struct.pack("=IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, snaplen, DLT_EN10MB))
        for frame in frames:
            sec, nsec = divmod(frame.timestamp_ns, 1_000_000_000)
            out.write(struct.pack("=IIII", sec, nsec, len(frame.data), max(frame.wire_len, len(frame.data))))
            out.write(frame.data)
            count += 1
    return count


# ---------------------------------------------------------------- pcapng


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("=HH", code, len(value)) + _pad(value)


def _options(*options: bytes) -> bytes:
    return b"".join(options) + struct.pack("=HH", _OPT_END, 0) if options else b""


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("=II", kind, length) + body + struct.pack("=I", length)


def section_header(application: str = "labctl") -> bytes:
    body = struct.pack("=IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)
    return _block(_SHB, body + _options(_option(_SHB_USERAPPL, application.encode())))


def interface_block(interface: Interface, snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """An IDB named ``node:iface``, described by its namespace, timestamps in nanoseconds."""
    options = _options(
        _option(_IF_NAME, interface.name.encode()),
        _option(_IF_DESCRIPTION, f"{interface.name} (netns {interface.namespace})".encode()),
        _option(_IF_TSRESOL, bytes([9])),
    )
    return _block(_IDB, struct.pack("=HHI", DLT_EN10MB, 0, snaplen) + options)


def packet_block(interface_id: int, frame: Frame, comment: str) -> bytes:
    """An EPB: nanosecond timestamp, direction flag, and ``comment`` (Wireshark's frame.comment)."""
    high, low = divmod(frame.timestamp_ns, 1 << 32)
    header = struct.pack("=IIIII", interface_id, high, low, len(frame.data), max(frame.wire_len, len(frame.data)))
    flags = _EPB_OUTBOUND if frame.direction == "out" else _EPB_INBOUND
    options = _options(_option(_OPT_COMMENT, comment.encode()), _option(_EPB_FLAGS, struct.pack("=I", flags)))
    return _block(_EPB, header + _pad(frame.data) + options)


def frame_comment(node: str, namespace: str, frame: Frame, extra: str | None = None) -> str:
    """``node:iface in (host) netns labctl-lab.node``, plus the verdict when one is known."""
    text = f"{node}:{frame.ifname} {frame.direction} ({frame.pkttype}) netns {namespace}"
    return f"{text}; {extra}" if extra else text


def write_pcapng(
    path: str | os.PathLike[str],
    frames: Iterable[Frame],
    *,
    node: str,
    namespace: str,
    snaplen: int = DEFAULT_SNAPLEN,
    comment: Comment | None = None,
) -> int:
    """Write pcapng of one node's frames: one IDB per interface they were seen on, a comment per frame."""
    items = ((Interface(node, f.ifname, namespace), f, comment(f) if comment else None) for f in frames)
    return write_pcapng_items(path, items, snaplen)


def write_pcapng_items(
    path: str | os.PathLike[str], items: Iterable[tuple[Interface, Frame, str | None]], snaplen: int = DEFAULT_SNAPLEN
) -> int:
    """Write pcapng of frames from any nodes: (where, frame, verdict or None), in the order given."""
    with open(path, "wb") as out:
        return _write_section(out, items, snaplen)


def _write_section(out: BinaryIO, items: Iterable[tuple[Interface, Frame, str | None]], snaplen: int) -> int:
    out.write(section_header())
    ids: dict[Interface, int] = {}
    count = 0
    for interface, frame, extra in items:
        interface_id = ids.get(interface)
        if interface_id is None:
            interface_id = ids[interface] = len(ids)
            out.write(interface_block(interface, snaplen))
        text = frame_comment(interface.node, interface.namespace, frame, extra)
        out.write(packet_block(interface_id, frame, text))
        count += 1
    return count
