"""One run's job disk: labctl's current source, the lab files and the guest's script, as a tar.

The guest's PID 1 (:data:`labctl.vm.image.GUEST_INIT`) unpacks it from the raw disk /dev/vdb and runs its
``guest.sh``.  Shipping the source per run is what lets the image outlive code changes: the image holds
only Debian packages and labctl's Python dependencies.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path, PurePosixPath

import labctl

GUEST_SCRIPT = r"""#!/bin/bash
# A labctl job in the guest: labctl from this job's source, on PATH; the modules labs use without naming
# them (this machine's kernel has them built in, Debian's as modules); then run the labs, or a shell.
export PYTHONPATH=/job/src PATH=/opt/labctl/venv/bin:$PATH
printf '#!/bin/sh\nPYTHONPATH=/job/src exec /opt/labctl/venv/bin/python -m labctl.cli "$@"\n' >/usr/local/bin/labctl
chmod +x /usr/local/bin/labctl
for module in veth tun bridge br_netfilter macvlan vxlan nf_tables nf_conntrack nfnetlink_log ebtables \
        ebtable_filter ebtable_nat ip_tables iptable_filter iptable_nat iptable_mangle iptable_raw \
        iptable_security ip6_tables ip6table_filter ip6table_nat ip6table_mangle ip6table_raw ip6table_security \
        sch_htb sch_tbf sch_ingress cls_u32 cls_bpf act_mirred; do
    modprobe -q "$module" || echo "labctl-guest: no module $module"
done
echo 1 >/proc/sys/kernel/sysrq
cd /job/work
if [ "$(cat /job/mode)" = shell ]; then
    echo "labctl VM: $(uname -r), labctl on PATH, labs in $PWD; exit (or Ctrl-D) powers off"
    setsid -c /bin/bash -l </dev/ttyS0 >/dev/ttyS0 2>&1
else
    python -m labctl.vm.guest /job/job.json /dev/vdc
fi
sync
echo o >/proc/sysrq-trigger
sleep 30
"""


def guest_path(host: str, index: int) -> str:
    """Where a lab file given as ``host`` lives under the guest's work folder: the same relative path when it
    is relative and stays below (``labs/x.yaml``), else a folder of its own."""
    path = PurePosixPath(host)
    if not path.is_absolute() and ".." not in path.parts:
        return str(path)
    return f"_files/{index}/{path.name}"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def pack(files: list[str], select: str | None, mode: str, dest: Path, command: list[str] | None = None) -> None:
    """Write the job tar to ``dest`` (a raw disk for the guest): run the labs, or ``command`` (exec), or a shell."""
    source = Path(labctl.__file__).parent
    entries = [{"host": f, "guest": guest_path(f, i)} for i, f in enumerate(files)]
    job = {"files": entries, "select": select, "command": command}
    with tarfile.open(dest, "w") as tar:
        tar.add(source, arcname="src/labctl", filter=_no_caches)
        for entry in entries:
            tar.add(entry["host"], arcname=f"work/{entry['guest']}")
        _add(tar, "job.json", json.dumps(job).encode())
        _add(tar, "mode", mode.encode())
        _add(tar, "guest.sh", GUEST_SCRIPT.encode(), 0o755)
    _pad(dest)


def _no_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info


def _pad(dest: Path) -> None:
    """A virtio disk is read in 512-byte sectors: round the file up so the tar's end is on the disk."""
    size = dest.stat().st_size
    with dest.open("ab") as f:
        f.truncate(-(-size // 512) * 512 + 512)
