"""The kernels a user names with ``--kernel``, and running the labs on each.

- ``host``: this machine's kernel, in this process (what ``labctl run`` always did);
- ``6.1`` (or ``debian``): Debian 12's own kernel, ``linux-image-cloud-amd64``, booted from the cached image;
- ``6.12`` (or ``backports``): the same package from bookworm-backports, installed in the same image beside
  6.1 and booted with its own initramfs and modules;
- a path to a bzImage: that kernel with the image's root filesystem.  It boots without an initramfs (the
  image's are built for its own kernels), so it needs virtio-blk, virtio-pci and ext4 built in; it finds no
  modules, and its options are read from /proc/config.gz if it has one (otherwise every ``requires:`` is
  unmet: SKIP).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.verify.results import LabResult
from labctl.verify.runner import run_labs
from labctl.vm import image, job, protocol, qemu
from labctl.vm.errors import VmError

IMAGE_KERNEL_NAMES = {
    "6.1": "6.1", "debian": "6.1", "bookworm": "6.1",
    "6.12": "6.12", "backports": "6.12", "bookworm-backports": "6.12",
}
"""What ``--kernel`` accepts for the image's kernels, and the series each names (the image's kernel of that series)."""
DEFAULT_TIMEOUT = float(os.environ.get("LABCTL_VM_TIMEOUT", 2400))
"""Seconds a guest may take for the whole job before it is killed (TCG runs every lab in ~10 min)."""


@dataclass(frozen=True)
class Kernel:
    label: str
    """As the user named it: host, 6.1, /path/to/bzImage."""
    bzimage: Path | None = None
    """None: this machine's kernel (host) or one of the image's kernels (its series is the label)."""

    @property
    def is_host(self) -> bool:
        return self.label == "host"


def resolve(name: str) -> Kernel:
    if name == "host":
        return Kernel("host")
    if name in IMAGE_KERNEL_NAMES:
        return Kernel(IMAGE_KERNEL_NAMES[name])
    if "/" in name or os.path.exists(name):
        path = Path(name)
        if not path.is_file():
            raise VmError(f"--kernel {name}: no such kernel image file")
        return Kernel(name, path.resolve())
    raise VmError(f"--kernel {name}: use host, 6.1 (Debian 12's linux-image-cloud-amd64), 6.12 (the same from "
                  "bookworm-backports) or a path to a bzImage")


@dataclass
class KernelRun:
    """The labs' results on one kernel, and what the run cost."""

    kernel: Kernel
    release: str
    results: list[LabResult]
    bad_input: bool = False
    accel: str = "host"
    boot_seconds: float = 0.0
    run_seconds: float = 0.0
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None
    """Why the guest stopped before its run finished (a kernel panic, the timeout, QEMU failing); None if it did
    not.  The labs it did not finish are results with that error, so they are never reported as passed."""

    def as_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel.label,
            "release": self.release,
            "accel": self.accel,
            "boot_seconds": round(self.boot_seconds, 2),
            "run_seconds": round(self.run_seconds, 2),
            "wall_seconds": round(self.wall_seconds, 2),
            "stopped": self.stopped,
        }


Progress = Callable[[str], None]


def run_host(files: list[str], select: str | None, keep: bool, reuse: bool, progress: Progress) -> KernelRun:
    from labctl.kernel.version import release

    start = time.monotonic()
    results, bad = run_labs(files, select=select, keep=keep, reuse=reuse,
                            on_check=lambda lab, check: progress(f"host: {lab}: {check}"))
    took = time.monotonic() - start
    return KernelRun(Kernel("host"), release(), results, bad, "host", 0.0, took, took)


def machine_for(kernel: Kernel, built: image.Image, disks: list[tuple[Path, bool]]) -> qemu.Machine:
    if kernel.bzimage is None:
        boot_kernel = built.kernel(kernel.label)
        return qemu.Machine(boot_kernel.vmlinuz, boot_kernel.initrd, built.rootfs, disks, f"init={image.INIT}")
    return qemu.Machine(kernel.bzimage, None, built.rootfs, disks, f"init={image.INIT}")


def boot(kernel: Kernel, files: list[str], select: str | None, mode: str, say: Progress,
         timeout: float = DEFAULT_TIMEOUT, progress: Progress | None = None,
         command: list[str] | None = None) -> tuple[dict[str, Any], str, float]:
    """Boot ``kernel`` on the image with a job; returns the guest's payload, the accelerator and wall time."""
    binary = qemu.ensure_qemu()
    built = image.ensure(say)
    with tempfile.TemporaryDirectory(prefix="labctl-vm-") as tmp:
        job_disk, result_disk, console = Path(tmp, "job.tar"), Path(tmp, "result.img"), Path(tmp, "console.log")
        job.pack(files, select, mode, job_disk, command)
        if mode == "shell":
            machine = machine_for(kernel, built, [(job_disk, True)])
            accel = "kvm" if qemu.kvm_usable(binary, image.CACHE) else "tcg"
            qemu.interactive(machine, binary, accel)
            return {}, accel, 0.0
        protocol.create_disk(str(result_disk))
        machine = machine_for(kernel, built, [(job_disk, True), (result_disk, False)])
        accel = "kvm" if qemu.kvm_usable(binary, image.CACHE) else "tcg"
        start = time.monotonic()
        stopped: VmError | None = None
        while True:
            stop = threading.Event()
            watcher = threading.Thread(target=_follow, args=(console, stop, progress), daemon=True)
            watcher.start()
            try:
                qemu.run(machine, binary, accel, timeout, console)
                if accel == "kvm":
                    qemu.remember_kvm(binary, image.CACHE, True)
                break
            except qemu.KvmBroken:
                say("vm: KVM does not work here (QEMU failed under it); booting again under TCG (remembered)")
                qemu.remember_kvm(binary, image.CACHE, False)
                accel = "tcg"
                protocol.create_disk(str(result_disk))
                start = time.monotonic()
            except VmError as exc:  # killed at its timeout, or QEMU failed: what the guest wrote before counts
                stopped = exc
                break
            finally:
                stop.set()
                watcher.join(timeout=2)
        try:
            payload = protocol.read(str(result_disk))
        except protocol.ProtocolError as exc:
            if stopped is not None:
                raise stopped from None
            raise VmError(f"{exc}; the guest's console:\n{qemu._tail(console)}") from None
        if stopped is not None:
            payload["stopped"] = str(stopped)
        elif not payload.get("finished", True):
            payload["stopped"] = _crash_line(console) or (
                f"the guest powered off before its run finished; its console:\n{qemu._tail(console)}")
        return payload, accel, time.monotonic() - start


_CRASH = (re.compile(r"Kernel panic"), re.compile(r"BUG: |Oops|general protection fault|watchdog: "))
"""Console lines that say why a kernel stopped, the panic line first (what an oops before it led to)."""


def _crash_line(console: Path) -> str | None:
    """The guest kernel's crash line on the console ("Kernel panic - not syncing: …"), if there is one."""
    try:
        lines = console.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for pattern in _CRASH:
        for line in lines:
            if pattern.search(line):
                return f"the guest's kernel crashed: {line.strip()}"
    return None


_PROGRESS = re.compile(r"labctl-progress: (.*)")


def _follow(console: Path, stop: threading.Event, progress: Progress | None) -> None:
    """Show the guest's progress lines (progress only: results never come from the console)."""
    if progress is None:
        return
    offset = 0
    while not stop.wait(0.5):
        with contextlib.suppress(OSError), console.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            offset += cut
            for line in chunk[:cut].decode(errors="replace").splitlines():
                match = _PROGRESS.search(line)
                if match:
                    progress(match.group(1))


def run_vm(kernel: Kernel, files: list[str], select: str | None, say: Progress, progress: Progress,
           timeout: float = DEFAULT_TIMEOUT) -> KernelRun:
    payload, accel, wall = boot(kernel, files, select, "run", say, timeout,
                                lambda text: progress(f"{kernel.label}: {text}"))
    if payload.get("error"):
        raise VmError(f"the labs could not run in the guest ({kernel.label}): {payload['error']}")
    release = str(payload.get("kernel", {}).get("release", "?"))
    results = protocol.lab_results(payload)
    stopped = payload.get("stopped")
    if stopped:
        results += unfinished(files, {lab.file for lab in results}, payload.get("running"), stopped, release)
    return KernelRun(kernel, release, results, bool(payload.get("bad_input")), accel,
                     float(payload.get("boot_seconds", 0.0)), float(payload.get("run_seconds", 0.0)), wall,
                     stopped=stopped)


def failed_run(kernel: Kernel, files: list[str], why: str) -> KernelRun:
    """A kernel whose guest gave no result at all (it did not boot, or died before its first lab): every lab is
    an error with that reason, so a run over several kernels still reports the others."""
    return KernelRun(kernel, "?", unfinished(files, set(), None, why, "?"), accel="?", stopped=why)


def unfinished(files: list[str], done: set[str], running: str | None, why: str, release: str) -> list[LabResult]:
    """Error results for the labs a stopped guest did not finish: the one it was running names why it stopped."""
    first_line = why.splitlines()[0] if why else "the guest stopped"
    results = []
    for file in files:
        if file in done:
            continue
        if file == running:
            error = f"the guest stopped during this lab: {first_line}"
        elif running is not None:
            error = f"not run: the guest stopped during {Path(running).name}"
        else:
            error = f"not run: {first_line}"
        results.append(LabResult(lab=_lab_name(file), file=file, error=error, kernel=release))
    return results


def _lab_name(file: str) -> str:
    """The lab's ``name:`` (the key the verdict table joins kernels on); the file's stem if it does not load."""
    from labctl.errors import LabctlError
    from labctl.verify.scope import load_lab_file

    try:
        return load_lab_file(file).name
    except LabctlError:
        return Path(file).stem
