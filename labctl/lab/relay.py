"""The VM relay: what QEMU does for a guest NIC, without a guest.

A ``vm`` node's NIC is a tap inside the VM's namespace; the host side is a tap
in the host node, enslaved to its bridge.  This process holds both taps' file
descriptors and copies every frame between them, so a frame the "VM" sends
leaves through a tap fd and enters the host on ``netif_receive_skb`` of the
host tap -- the path in notes §3.

It runs detached from ``labctl up`` and is found again by its command line
(``-m labctl.lab.relay --lab NAME``), so ``down``/``clean`` can stop it even
without state.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import time

from labctl.kernel import netns

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MODULE = "labctl.lab.relay"


def open_tap(namespace: str, ifname: str) -> int:
    """Attach to an existing persistent tap inside ``namespace``; returns the fd."""
    with netns.entered(namespace):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def relay(pairs: list[tuple[int, int]]) -> None:
    """Copy frames both ways between each pair of tap fds until terminated."""
    peer: dict[int, int] = {}
    for a, b in pairs:
        peer[a], peer[b] = b, a
    poller = select.epoll()
    for fd in peer:
        poller.register(fd, select.EPOLLIN)
    while True:
        for fd, _ in poller.poll():
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(peer[fd], frame)  # a full peer queue drops, as a NIC would


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--lab", required=True)
    parser.add_argument("--vm", required=True)
    parser.add_argument("--pair", action="append", required=True, help="NS/IF=NS/IF")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fds: list[tuple[int, int]] = []
    for spec in args.pair:
        left, right = spec.split("=")
        fds.append((open_tap(*left.split("/")), open_tap(*right.split("/"))))
    print("ready", flush=True)
    # detach from the starter's pipe so it can exit
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    relay(fds)
    return 0


def start(lab: str, vm: str, pairs: list[tuple[str, str, str, str]], timeout: float = 5.0) -> int:
    """Start a detached relay for ``vm``; returns its pid once both taps are attached."""
    argv = [sys.executable, "-m", MODULE, "--lab", lab, "--vm", vm]
    for ns_a, if_a, ns_b, if_b in pairs:
        argv += ["--pair", f"{ns_a}/{if_a}={ns_b}/{if_b}"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        proc.kill()
        _, err = proc.communicate()
        raise OSError(f"relay for vm {vm} did not start: {err.decode().strip()[-500:]}")
    proc.stdout.close()
    assert proc.stderr is not None
    proc.stderr.close()
    return proc.pid


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def find(lab: str | None = None) -> dict[int, tuple[str, str]]:
    """Running relays (pid -> (lab, vm)), found by command line, not by state."""
    found: dict[int, tuple[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if MODULE not in argv or "--lab" not in argv or "--vm" not in argv:
            continue
        relay_lab = argv[argv.index("--lab") + 1]
        if lab is None or relay_lab == lab:
            found[int(entry)] = (relay_lab, argv[argv.index("--vm") + 1])
    return found


def alive(pid: int, lab: str) -> bool:
    return pid in find(lab)


def stop(pids: list[int], timeout: float = 2.0) -> None:
    """Terminate relays and wait until they are gone (their tap fds keep namespaces alive)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)
        if os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
