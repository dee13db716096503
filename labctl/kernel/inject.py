"""Sending frames from AF_PACKET inside a node's namespace, many per system call.

:class:`Injector` sends one prebuilt frame many times with ``sendmmsg``
batches -- no Scapy in the loop -- through the qdisc unless asked to bypass
it, and says which frames the kernel refused and why.  :func:`write_tap`
feeds a frame to a tap fd, the way a VM's NIC does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import time
from typing import Any

from labctl.kernel.packet import SOL_PACKET, _bind_packet, _ifindex, _libc, _packet_socket

# <linux/if_packet.h>, <asm-generic/socket.h>
PACKET_QDISC_BYPASS = 20
SO_SNDBUFFORCE = 32


class InjectError(RuntimeError):
    """Frames cannot be sent at all (no such interface, frame the device refuses)."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int

# errors that say the frame or device is unusable: repeating the send is pointless
_FATAL_SEND_ERRORS = frozenset({errno.EMSGSIZE, errno.EINVAL, errno.ENXIO, errno.ENODEV, errno.EFAULT})
_ERRNO_UNREPORTED = -1  # internal marker; recorded as errno 0 in Injector.errors
_SINGLE_AFTER_ERROR = 1024


class Injector:
    """Send a prebuilt frame out of ``ifname`` in ``namespace`` through AF_PACKET.

    The frame goes through ``dev_queue_xmit`` (qdisc, then the driver, with
    AF_PACKET taps seeing it as outgoing) unless ``qdisc_bypass``; with bypass
    the driver is called directly and taps on the sending node see nothing.
    Each frame is attempted exactly once: ``send`` returns how many the kernel
    accepted and ``errors`` maps errno -> frames refused (e.g. ENOBUFS when the
    qdisc dropped them; 0 when sendmmsg did not say).
    """

    def __init__(
        self,
        namespace: str,
        ifname: str,
        *,
        qdisc_bypass: bool = False,
        batch: int = 512,
        sndbuf: int | None = None,
    ) -> None:
        self.namespace = namespace
        self.ifname = ifname
        self.batch = max(1, batch)
        self.errors: dict[int, int] = {}
        self._sock = _packet_socket(namespace)
        try:
            if qdisc_bypass:
                self._sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            if sndbuf is not None:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
            # protocol 0: the socket never receives, so it needs no reader
            _bind_packet(self._sock, _ifindex(self._sock, ifname), 0)
        except OSError as exc:
            self._sock.close()
            raise InjectError(f"cannot inject on {ifname} in {namespace}: {exc.strerror}") from exc

    def send(self, frame: bytes, count: int = 1, rate: float | None = None) -> int:
        """Send ``frame`` ``count`` times, at ``rate`` frames/s if given; return frames sent.

        sendmmsg stops at the first refused frame and, when some frames of the
        batch went out, does not report why.  That frame is counted under
        errno 0 and the next :data:`_SINGLE_AFTER_ERROR` frames go one per call,
        so further refusals (typically a run of qdisc drops) get their errno.
        """
        self.errors = {}
        buf = ctypes.create_string_buffer(frame, len(frame))
        iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(frame))
        batch = self.batch if rate is None else max(1, min(self.batch, int(rate / 1000)))
        msgs = (_Mmsghdr * batch)()
        for msg in msgs:
            msg.msg_hdr.msg_iov = ctypes.pointer(iov)
            msg.msg_hdr.msg_iovlen = 1
        fd = self._sock.fileno()
        sent = attempted = single_until = 0
        start = time.perf_counter()
        while attempted < count:
            if rate is not None:
                _pace(start + attempted / rate)
            n = 1 if attempted < single_until else min(batch, count - attempted)
            done = _libc.sendmmsg(fd, msgs, n, 0)
            failed = 0
            if done < 0:
                failed, done = ctypes.get_errno(), 0
                if failed == errno.EINTR:
                    continue
            elif done < n:
                failed = _ERRNO_UNREPORTED
            sent += done
            attempted += done
            if failed:
                self._failed(failed)
                attempted += 1
                single_until = attempted + _SINGLE_AFTER_ERROR
        return sent

    def _failed(self, code: int) -> None:
        if code in _FATAL_SEND_ERRORS:
            raise InjectError(f"sending on {self.ifname} in {self.namespace}: {os.strerror(code)}")
        key = max(code, 0)
        self.errors[key] = self.errors.get(key, 0) + 1

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pace(target: float) -> None:
    """Sleep until ``target`` (perf_counter time); sleeping is coarse, so spin the last 200 us."""
    while (delay := target - time.perf_counter()) > 0:
        if delay > 0.0002:
            time.sleep(delay - 0.0002)


def inject(
    namespace: str,
    ifname: str,
    frame: bytes,
    count: int = 1,
    rate: float | None = None,
    **options: Any,
) -> int:
    """One-shot :class:`Injector` for callers that send a single burst."""
    with Injector(namespace, ifname, **options) as injector:
        return injector.send(frame, count, rate)


def write_tap(fd: int, frame: bytes) -> int:
    """Write one frame on a tap fd (IFF_TAP|IFF_NO_PI): it enters the host as if from a NIC."""
    return os.write(fd, frame)
