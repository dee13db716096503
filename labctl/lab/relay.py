"""The VM relay: what QEMU does for a guest NIC, without a guest.

A ``vm`` node's NIC is a tap inside the VM's namespace; the host side is a tap
in the host node, enslaved to its bridge.  This process holds both taps' file
descriptors and copies every frame between them, so a frame the "VM" sends
leaves through a tap fd and enters the host on ``netif_receive_skb`` of the
host tap -- the path in notes §3.

It runs detached from ``labctl up`` and is found again by the pidfile it
writes under /run/labctl/relays (a directory only root can write), checked
against the live process: owned by root, the start time it recorded, and our
module on its command line.  So ``down``/``clean`` can stop it even without
lab state, and no other user's process -- whatever its argv says -- is ever
taken for a relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time

from labctl.errors import LabctlError
from labctl.kernel import netns, procs, registry
from labctl.names import check_lab_name, check_node_name

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MODULE = "labctl.lab.relay"
RELAYS_DIR = os.path.join(registry.STATE_DIR, "relays")


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
    import argparse  # only the relay process parses arguments: status and down import this module for find()

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--lab", required=True)
    parser.add_argument("--vm", required=True)
    parser.add_argument("--pair", action="append", required=True, help="NS/IF=NS/IF")
    args = parser.parse_args(argv)
    try:
        check_lab_name(args.lab)
        check_node_name(args.vm)
    except LabctlError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _write_pidfile(args.lab, args.vm)
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


def _pidfile(pid: int) -> str:
    return f"{pid}.json"


def _write_pidfile(lab: str, vm: str) -> None:
    """Record this relay (pid, start time, lab, vm) before it touches a tap; only root can write there."""
    pid = os.getpid()
    record = {"pid": pid, "start": procs.start_time(pid), "lab": lab, "vm": vm}
    dir_fd = registry.open_dir(RELAYS_DIR)
    try:
        registry.write_atomically(dir_fd, _pidfile(pid), json.dumps(record))
    finally:
        os.close(dir_fd)


def _record(dir_fd: int, name: str) -> dict[str, object] | None:
    try:
        text = registry.read_text(dir_fd, name)
        data = json.loads(text) if text else None
    except (LabctlError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_relay(record: dict[str, object], pid: int) -> bool:
    """The process at ``pid`` is the relay the record describes (and not a reused pid or a look-alike)."""
    return (
        record.get("pid") == pid
        and record.get("start") is not None
        and procs.start_time(pid) == record.get("start")
        and procs.owned_by_root(pid)
        and MODULE in procs.cmdline(pid)
    )


def find(lab: str | None = None) -> dict[int, tuple[str, str]]:
    """Running relays (pid -> (lab, vm)), found by their pidfiles, not by state or argv.

    Pidfiles of relays that are gone are removed on the way.
    """
    found: dict[int, tuple[str, str]] = {}
    dir_fd = registry.open_dir(RELAYS_DIR)
    try:
        for name in os.listdir(dir_fd):
            stem = name.removesuffix(".json")
            if not name.endswith(".json") or not stem.isdigit():
                continue
            pid = int(stem)
            record = _record(dir_fd, name)
            if record is None or not _is_relay(record, pid):
                if record is None or not procs.alive(pid) or procs.start_time(pid) != record.get("start"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
                continue
            relay_lab, vm = str(record.get("lab")), str(record.get("vm"))
            if lab is None or relay_lab == lab:
                found[pid] = (relay_lab, vm)
    finally:
        os.close(dir_fd)
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
    if pids:
        find()  # drops the pidfiles of the relays just stopped


if __name__ == "__main__":
    sys.exit(main())
