"""A captured frame: its bytes, which device saw it, which way and when; and its classic pcap file.

What :class:`labctl.kernel.capture.Capture` yields and the evidence, the
pcap writers and the CLI consume: kept apart from the capture so that code
handling frames does not load the capture's ring and filters.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from labctl.kernel.bpf import DEFAULT_SNAPLEN

if TYPE_CHECKING:
    from scapy.packet import Packet

Direction = Literal["in", "out"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame, with where and which way the kernel saw it."""

    timestamp_ns: int
    ifname: str
    pkttype: str
    data: bytes
    wire_len: int

    @property
    def timestamp(self) -> float:
        return self.timestamp_ns / 1e9

    @property
    def direction(self) -> Direction:
        """'out' for frames the node transmitted, 'in' for everything it received."""
        return "out" if self.pkttype == "outgoing" else "in"

    def scapy(self) -> Packet:
        """Decode with Scapy (imported only here: the capture path never needs it)."""
        import scapy.layers.all  # noqa: F401 - registers IP/UDP/... so Ether() decodes the layers above it
        from scapy.layers.l2 import Ether

        return Ether(self.data)


def write_pcap(path: str | os.PathLike[str], frames: Iterable[Frame], snaplen: int = DEFAULT_SNAPLEN) -> int:
    """Classic pcap (the writers live in :mod:`labctl.kernel.pcap`)."""
    from labctl.kernel import pcap

    return pcap.write_pcap(path, frames, snaplen)
