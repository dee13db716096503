"""The guest's disk image: Debian 12 with two Debian kernels, built once and cached under /var/cache/labctl.

Why an image and not the host's files: the point of a VM run is *another* kernel -- Debian 12's own
``linux-image-cloud-amd64`` (6.1), which has as modules what the host lacks (netem, 802.1Q, bond, VRF, GRE,
flower, ebtable_broute ...), and the same package from bookworm-backports (6.12), a kernel between 6.1 and
the host's that the labs' ``kernel:`` boundaries (6.7, 6.10) fall inside.  Their modules and initramfs come
with the packages, so a debootstrap of Debian 12 with both installed is a complete, consistent guest for
either: one root filesystem, one cache entry, and each kernel booted with its own vmlinuz and initramfs
(taken out of the image's /boot and named after the kernel's series: ``vmlinuz-6.1``, ``initrd-6.12.img``).

The image holds only what changes rarely: Debian's packages (the same list ``setup.sh`` installs on the host,
``debian-packages.txt``) and a virtualenv with labctl's Python dependencies (wheels built on the host from PyPI,
installed in the chroot: the guest never has a network).  labctl's own source and the lab files travel with
each run (:mod:`labctl.vm.job`), so changing the code never rebuilds the image; the image is rebuilt only when
its recipe changes -- its directory is named after the recipe's hash.

The build runs in a private mount namespace (``unshare -m``): the chroot's /proc mount never shows on the host.
The root filesystem is made by ``mkfs.ext4 -d`` straight from the directory (no loop device, no mount), and a
guest always boots it with ``snapshot=on``, so the cached image is never written by a guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from labctl.vm.errors import VmError

CACHE = Path(os.environ.get("LABCTL_VM_CACHE", "/var/cache/labctl/vm"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
BACKPORTS = f"{SUITE}-backports"
"""The backports kernel is the version ``KERNEL_PACKAGE`` depends on in this suite (6.12 in bookworm-backports),
installed beside the suite's own (the two metapackages share a name, so the versioned package is named)."""
VENV = "/opt/labctl/venv"
INIT = "/usr/local/sbin/labctl-guest-init"
RECIPE_VERSION = 2
"""Bump when the build steps below change in a way the recipe's data does not show."""

GUEST_INIT = """#!/bin/bash
# PID 1 of a labctl guest: mount what labctl needs, unpack the job disk (/dev/vdb: a tar with labctl's
# source, the lab files and the job's own script), and hand over to that script.  Anything that may change
# with labctl's code lives in the job, not here, so the image outlives code changes.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mountpoint -q /proc || mount -t proc proc /proc   # the initramfs moved its own here
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -o remount,rw /
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname labctl-vm
ip link set lo up
mkdir -p /job
if ! tar -xf /dev/vdb -C /job; then
    echo "labctl-guest-init: no job disk on /dev/vdb" >&2
    echo o > /proc/sysrq-trigger
fi
exec /bin/bash /job/guest.sh
"""


@dataclass(frozen=True)
class BootKernel:
    """One of the image's kernels: its series (6.1, 6.12), ``uname -r``, and its files taken out of /boot."""

    series: str
    release: str
    vmlinuz: Path
    initrd: Path


@dataclass(frozen=True)
class Image:
    """A built image: the root filesystem and the kernels (+ initramfs) taken out of it, by series."""

    directory: Path
    rootfs: Path
    kernels: dict[str, BootKernel]
    build_seconds: float

    def kernel(self, series: str) -> BootKernel:
        if series not in self.kernels:
            raise VmError(f"the image {self.directory} has no {series} kernel (it has {', '.join(self.kernels)})")
        return self.kernels[series]


def series(release: str) -> str:
    """6.1.0-28-cloud-amd64 -> 6.1, 6.12.57+deb12-cloud-amd64 -> 6.12: the name ``--kernel`` takes."""
    return ".".join(release.split("-")[0].split("+")[0].split(".")[:2])


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def debian_packages() -> list[str]:
    """The one list of Debian packages (shared with setup.sh)."""
    path = repo_root() / "debian-packages.txt"
    if not path.exists():
        raise VmError(f"{path} is missing: the VM image is built from a checkout of labctl")
    names = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [n for n in names if n]


def python_requirements() -> list[str]:
    """labctl's run-time Python dependencies, as installed here (pyproject's ``dependencies``)."""
    requires = importlib.metadata.requires("labctl") or []
    return sorted(r for r in requires if "extra ==" not in r)


def recipe() -> dict[str, object]:
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "mirror": MIRROR,
        "kernel": KERNEL_PACKAGE,
        "backports": BACKPORTS,
        "debian": debian_packages(),
        "python": python_requirements(),
        "init": GUEST_INIT,
    }


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def image_dir() -> Path:
    return CACHE / f"debian12-{recipe_hash()}"


def load() -> Image | None:
    """The image of the current recipe, if it was built."""
    directory = image_dir()
    try:
        meta = json.loads((directory / "image.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        kernels = {
            name: BootKernel(name, release, directory / f"vmlinuz-{name}", directory / f"initrd-{name}.img")
            for name, release in meta["kernels"].items()
        }
        return Image(directory, directory / "rootfs.img", kernels, meta["build_seconds"])
    except (KeyError, AttributeError, TypeError):
        return None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(directory.parent / ".build.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a second labctl waits for the first one's build, then uses it
        yield
    finally:
        os.close(fd)


def ensure(say: Callable[[str], None] = print) -> Image:
    """The image of the current recipe, built now if it is not cached."""
    image = load()
    if image is not None:
        return image
    directory = image_dir()
    with _locked(directory):
        image = load()
        if image is None:
            image = build(directory, say)
    return image


def _run(argv: list[str], log: Path, what: str, **kwargs: object) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise VmError(f"image build failed while {what} (exit {result.returncode}); log {log}:\n{tail}")


CHROOT_SCRIPT = """set -euo pipefail
root=$1 wheels=$2
mount -t proc proc "$root/proc"
trap 'umount -l "$root/proc" || true' EXIT
printf '#!/bin/sh\\nexit 101\\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
printf 'deb {mirror} {suite} main\\ndeb {mirror} {backports} main\\n' > "$root/etc/apt/sources.list"
chroot "$root" apt-get update -qq
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {packages}
# the backports kernel: the versioned package its metapackage depends on (the suite's metapackage stays)
version=$(chroot "$root" apt-cache madison {kernel} \\
    | awk -F'|' '$3 ~ /{backports}\\// {{gsub(/ /, "", $2); print $2; exit}}')
backport=$(chroot "$root" apt-cache show "{kernel}=$version" \\
    | sed -n 's/^Depends: \\(linux-image-[^ ,]*\\).*/\\1/p' | head -n1)
[ -n "$backport" ] || {{ echo "no {kernel} in {backports}" >&2; exit 1; }}
echo "backports kernel: $backport ($version)"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
    -t {backports} "$backport"
chroot "$root" apt-get clean
rm -rf "$root/var/lib/apt/lists/"*
mkdir -p "$root/wheels"; cp "$wheels"/*.whl "$root/wheels/"
chroot "$root" python3 -m venv {venv}
chroot "$root" {venv}/bin/pip install -q --no-index --find-links /wheels {requirements}
rm -rf "$root/wheels" "$root/usr/sbin/policy-rc.d"
"""


def build(directory: Path, say: Callable[[str], None]) -> Image:
    """debootstrap + Debian's kernel + the Debian list + a venv of wheels, then an ext4 image of it."""
    for tool in ("debootstrap", "mkfs.ext4", "unshare"):
        if shutil.which(tool) is None:
            from labctl.vm import qemu

            qemu.apt_install(["debootstrap", "e2fsprogs", "util-linux"])
            break
    start = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "build.log"
    log.write_text("")
    work = Path(tempfile.mkdtemp(prefix="build-", dir=directory))
    root, wheels = work / "root", work / "wheels"
    try:
        say(f"vm: building the Debian 12 image once ({directory}, log {log})")
        say("vm: building wheels of labctl's Python dependencies (PyPI)")
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), *python_requirements()],
             log, "building wheels")
        say(f"vm: debootstrap --variant=minbase {SUITE}")
        _run(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR], log, "running debootstrap")
        packages = [KERNEL_PACKAGE, *debian_packages()]
        say(f"vm: installing {KERNEL_PACKAGE} ({SUITE} and {BACKPORTS}) and {len(packages) - 1} Debian packages,"
            " and the venv")
        script = CHROOT_SCRIPT.format(
            mirror=MIRROR, suite=SUITE, backports=BACKPORTS, kernel=KERNEL_PACKAGE, packages=" ".join(packages),
            venv=VENV,
            requirements=" ".join(f"'{r}'" for r in python_requirements()),
        )
        _run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "build", str(root),
              str(wheels)], log, "installing packages in the chroot")
        init = root / INIT.lstrip("/")
        init.write_text(GUEST_INIT)
        init.chmod(0o755)
        releases = _kernel_releases(root)
        for name, release in releases.items():
            shutil.copy(root / "boot" / f"vmlinuz-{release}", directory / f"vmlinuz-{name}")
            shutil.copy(root / "boot" / f"initrd.img-{release}", directory / f"initrd-{name}.img")
        used = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True).stdout.split()[0])
        size = f"{used * 2 + 512}M"  # room for a guest's writes (they go to a snapshot anyway)
        say(f"vm: writing the ext4 root filesystem ({used} MiB used, {size})")
        _run(["mkfs.ext4", "-q", "-F", "-L", "labctl", "-d", str(root), str(directory / "rootfs.img"), size],
             log, "making the ext4 image")
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    seconds = time.monotonic() - start
    (directory / "recipe.json").write_text(json.dumps(recipe(), indent=2))
    (directory / "image.json").write_text(json.dumps({"kernels": releases, "build_seconds": round(seconds, 1)}))
    say(f"vm: image built in {seconds:.0f} s (kernels {', '.join(releases.values())})")
    for old in directory.parent.glob("debian12-*"):
        if old != directory and old.is_dir():  # images of earlier recipes are never used again
            shutil.rmtree(old, ignore_errors=True)
    image = load()
    assert image is not None
    return image


def _kernel_releases(root: Path) -> dict[str, str]:
    """The image's kernels by series: the suite's and the backports one, two different series."""
    releases = sorted(p.name for p in (root / "lib" / "modules").iterdir())
    by_series = {series(release): release for release in releases}
    if len(releases) != 2 or len(by_series) != 2:
        raise VmError(f"expected two kernels of two series in the image ({SUITE}, {BACKPORTS}), found {releases}")
    return dict(sorted(by_series.items(), key=lambda item: [int(part) for part in item[0].split(".")]))
