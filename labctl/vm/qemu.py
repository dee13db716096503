"""QEMU: installed from Debian on first use, KVM when it works and TCG otherwise, a hard timeout.

KVM is not trusted because /dev/kvm exists: on some hosts (nested virtualisation) a guest stops with
"KVM internal error. Suberror: 1" (an instruction KVM cannot emulate) and QEMU then *pauses* the guest
instead of exiting, or QEMU aborts at start ("failed to set MSR 0x10a", this machine with ``-cpu host``).
So a boot watches QEMU's stderr: on that message, or any failed exit under KVM, the guest is killed and
booted again under TCG, and the verdict is remembered for this host kernel and QEMU version
(``accel.json`` in the cache), so later runs go straight to what works.

The guest has no network at all (``-nic none``): it cannot change the host, whatever it runs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from labctl.vm.errors import VmError

QEMU = "qemu-system-x86_64"
KVM_BROKEN = "KVM internal error"
MEMORY_MB = 2048
CPUS = 2  # labs name CPU 1 (RPS masks, cpu: on injections)
TCG_ACCEL = "tcg,thread=single"
"""One host thread runs both vCPUs.  Multi-threaded TCG (QEMU 7.2) let Debian's 6.12 panic 130 s into a run of
every lab with RIP in the middle of an instruction (``dev_queue_xmit_nit``, code that packet sockets' static
keys patch at run time while the other vCPU runs it); single-threaded TCG keeps code patching coherent and,
on this shared 2-core host, was faster too (6.12, every lab: 210 s wall against 316 s)."""
TCG_CPU = "max,-cx16"
"""Under TCG, QEMU's ``max`` CPU without CMPXCHG16B.  With CX16, Debian's 6.12 under Debian's QEMU 7.2 (TCG,
multi-threaded) oopses within seconds of boot, every time, in ``kmem_cache_alloc_noprof`` right after SLUB's
per-CPU ``cmpxchg16b %gs:(%rsi)`` (``this_cpu_try_cmpxchg128``, new in 6.8), with garbage in EFLAGS -- also
with ``-cpu qemu64`` or ``max,-la57`` (single-threaded TCG hangs in soft lockups instead); 6.1 boots with it.  Without
CX16 the kernel uses its own ``this_cpu_cmpxchg16b_emu`` (6.12) or SLUB's locked path (6.1) and both boot
and run every lab.  KVM keeps ``-cpu host``."""


def apt_install(packages: list[str]) -> None:
    """Install Debian packages (first use of the VM part); waits for another apt to finish."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    base = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-qq", "--no-install-recommends"]
    result = subprocess.run([*base, "install", *packages], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq"], capture_output=True, env=env)
        result = subprocess.run([*base, "install", *packages], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise VmError(f"apt-get install {' '.join(packages)} failed: {result.stderr.strip()[-800:]}")


def ensure_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        print("vm: installing QEMU (Debian package qemu-system-x86), once", file=sys.stderr)
        apt_install(["qemu-system-x86"])
        path = shutil.which(QEMU)
    if path is None:
        raise VmError(f"{QEMU} is not on PATH after installing qemu-system-x86")
    return path


def _accel_file(cache: Path) -> Path:
    return cache / "accel.json"


def _host_key(qemu: str) -> str:
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return f"{platform.release()} / {version}"


def kvm_usable(qemu: str, cache: Path) -> bool:
    """KVM unless /dev/kvm is missing or an earlier boot on this host kernel + QEMU hit a KVM internal error."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        known = json.loads(_accel_file(cache).read_text())
    except (OSError, ValueError):
        return True
    return bool(known.get(_host_key(qemu), True))


def remember_kvm(qemu: str, cache: Path, works: bool) -> None:
    path = _accel_file(cache)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[_host_key(qemu)] = works
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2))


@dataclass
class Machine:
    """What to boot: a kernel, its initramfs, the root image (always a snapshot) and extra raw disks."""

    kernel: Path
    initrd: Path | None
    rootfs: Path
    disks: list[tuple[Path, bool]] = field(default_factory=list)
    """Raw disks after the root (vdb, vdc, …), each with read-only or not."""
    append: str = ""

    def argv(self, qemu: str, accel: str) -> list[str]:
        cmdline = f"root=/dev/vda rw console=ttyS0 panic=-1 quiet loglevel=4 {self.append}".strip()
        argv = [qemu, "-machine", "q35", "-m", str(MEMORY_MB), "-smp", str(CPUS), "-nic", "none",
                "-no-reboot", "-display", "none", "-kernel", str(self.kernel), "-append", cmdline]
        if accel == "kvm":
            argv += ["-accel", "kvm", "-cpu", "host"]
        else:
            argv += ["-accel", TCG_ACCEL, "-cpu", TCG_CPU]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        argv += ["-drive", f"file={self.rootfs},if=virtio,format=raw,snapshot=on"]
        for path, readonly in self.disks:
            argv += ["-drive", f"file={path},if=virtio,format=raw" + (",readonly=on" if readonly else "")]
        return argv


class KvmBroken(Exception):
    """QEMU reported a KVM internal error: the guest was killed; boot again under TCG."""


def run(machine: Machine, qemu: str, accel: str, timeout: float, console: Path) -> None:
    """Boot without a terminal, console to ``console``; the guest powers off when done. Killed at ``timeout``."""
    argv = [*machine.argv(qemu, accel), "-serial", f"file:{console}", "-monitor", "none"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stderr: list[str] = []
    broken = threading.Event()

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.append(line)
            if KVM_BROKEN in line:
                broken.set()
                proc.kill()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise VmError(
            f"the guest did not finish within {timeout:.0f} s ({accel.upper()}): killed. "
            f"Its console is in {console}:\n{_tail(console)}"
        ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    if broken.is_set() or (accel == "kvm" and returncode != 0):  # e.g. "failed to set MSR 0x10a", an abort
        raise KvmBroken("".join(stderr[-5:]))
    if returncode != 0:
        raise VmError(f"QEMU exited with {returncode}: {''.join(stderr).strip()[-800:]}\nconsole ({console}):\n"
                      f"{_tail(console)}")


def interactive(machine: Machine, qemu: str, accel: str) -> int:
    """Boot with the guest's serial console on this terminal (Ctrl-A X quits QEMU)."""
    argv = [*machine.argv(qemu, accel), "-serial", "mon:stdio"]
    return subprocess.run(argv).returncode


def _tail(console: Path, lines: int = 25) -> str:
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no console output)"
