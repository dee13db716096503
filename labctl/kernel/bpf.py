"""Capture filters: libpcap compiles tcpdump syntax; the kernel runs it, or userspace for tags in metadata.

Split from ``packet.py`` (the sockets and the ring): this is what a filter
*is* -- classic BPF from ``pcap_compile`` on a dead handle, attached with
SO_ATTACH_FILTER -- and the one case the kernel cannot judge: a received
802.1Q tag the kernel moved into skb metadata before any tap saw the frame.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import socket
import struct
import threading
from collections.abc import Sequence

SO_ATTACH_FILTER = 26

# pcap-linktype.h / DLT values as libpcap's pcap_open_dead() takes them
DLT_EN10MB = 1
DLT_RAW = 12
DEFAULT_SNAPLEN = 262144

SockFilter = tuple[int, int, int, int]
"""One classic BPF instruction: (code, jt, jf, k), as in ``struct sock_filter``."""


class CaptureError(RuntimeError):
    """A capture could not be set up (bad filter, missing interface, ...)."""


# ---------------------------------------------------------------- libpcap / BPF


class _BpfInsn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


_pcap_lock = threading.Lock()  # libpcap's parser is not reentrant on every version
_PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF


@functools.cache
def _libpcap() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap")
    if name is None:
        raise CaptureError("libpcap is not installed (Debian: libpcap0.8); it compiles capture filters")
    lib = ctypes.CDLL(name)
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_compile.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(_BpfProgram),
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint32,
    ]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.bpf_filter.restype = ctypes.c_uint
    lib.bpf_filter.argtypes = [ctypes.POINTER(_BpfInsn), ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]
    return lib


def compile_filter(expr: str, *, linktype: int = DLT_EN10MB, snaplen: int = DEFAULT_SNAPLEN) -> list[SockFilter]:
    """Compile tcpdump filter syntax to classic BPF with libpcap (what tcpdump does).

    A "dead" pcap handle is enough: no device is opened, so this works for a
    device that lives in another namespace.  Raises :class:`CaptureError`
    carrying libpcap's own message for a bad expression.
    """
    lib = _libpcap()
    with _pcap_lock:
        handle = lib.pcap_open_dead(linktype, snaplen)
        if not handle:
            raise CaptureError("libpcap could not open a dead handle")
        prog = _BpfProgram()
        try:
            if lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), 1, _PCAP_NETMASK_UNKNOWN) != 0:
                message = (lib.pcap_geterr(handle) or b"unknown error").decode(errors="replace")
                raise CaptureError(f"bad capture filter {expr!r}: {message}")
            insns = [(i.code, i.jt, i.jf, i.k) for i in prog.bf_insns[: prog.bf_len]]
            lib.pcap_freecode(ctypes.byref(prog))
            return insns
        finally:
            lib.pcap_close(handle)


# <linux/filter.h>: classic BPF opcodes and the ancillary load of "skb has a VLAN tag in metadata"
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SKF_AD_VLAN_TAG_PRESENT = (-0x1000 + 48) & 0xFFFFFFFF
_VLAN_WORD = re.compile(r"\bvlan\b")


def needs_vlan_tags(expr: str | None) -> bool:
    """Whether a filter tests VLAN tags, which the kernel may have moved out of the frame (see :class:`VlanFilter`)."""
    return bool(expr) and _VLAN_WORD.search(expr or "") is not None


def tagged_frames_pass(program: Sequence[SockFilter], snaplen: int) -> list[SockFilter]:
    """``program``, preceded by: a frame whose VLAN tag is in skb metadata is passed up as it is.

    On receive the kernel moves an 802.1Q tag out of the frame into
    ``skb->vlan_tci`` before any tap sees it (``skb_vlan_untag`` in
    ``__netif_receive_skb_core``, whatever the device), so libpcap's code for
    ``vlan 100`` -- which reads the ethertype at offset 12 -- never matches a
    received tagged frame.  Those frames are let through here and judged in
    userspace on the frame with its tag put back (:class:`VlanFilter`); every
    other frame meets ``program`` in the kernel, as before.  (Jumps are
    relative, so prepending three instructions leaves ``program`` intact.)
    """
    return [
        (_BPF_LD_W_ABS, 0, 0, _SKF_AD_VLAN_TAG_PRESENT),
        (_BPF_JEQ_K, 1, 0, 0),  # no tag in metadata: on to the program
        (_BPF_RET_K, 0, 0, snaplen),
        *program,
    ]


class VlanFilter:
    """The filter run in userspace on frames whose tag the kernel kept in metadata, tag re-inserted.

    What libpcap does when it filters in userspace on Linux: the tag comes back
    from ``tp_vlan_tci`` (``TP_STATUS_VLAN_VALID`` in the TPACKET_V3 header, the
    ring's form of PACKET_AUXDATA) and goes back into the frame, then the very
    program libpcap compiled runs on it (libpcap's ``bpf_filter``).
    """

    def __init__(self, program: Sequence[SockFilter]) -> None:
        self._lib = _libpcap()
        self._insns = (_BpfInsn * len(program))(*[_BpfInsn(*insn) for insn in program])

    def matches(self, data: bytes, wire_len: int) -> bool:
        return bool(self._lib.bpf_filter(self._insns, data, max(wire_len, len(data)), len(data)))


def attach_filter(sock: socket.socket, program: Sequence[SockFilter]) -> None:
    """SO_ATTACH_FILTER: the kernel runs ``program`` on each skb before queueing it."""
    array = (_BpfInsn * len(program))(*[_BpfInsn(*insn) for insn in program])
    fprog = struct.pack("@HP", len(program), ctypes.addressof(array))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
