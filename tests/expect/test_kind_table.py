"""The table the check model is made from (KIND_MODULES) is the registry, and a check imports only its kinds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from labctl.expect.base import KIND_MODULES, kinds


def test_the_table_names_every_kind_its_module_in_report_order() -> None:
    registered = {key: type(kind).__module__.rpartition(".")[2] for key, kind in kinds().items()}
    assert list(KIND_MODULES.items()) == list(registered.items())


def test_a_lab_file_imports_only_the_kinds_its_checks_use(tmp_path: Path) -> None:
    lab = tmp_path / "one-kind.yaml"
    lab.write_text(
        "name: onekind\ntopology:\n  nodes:\n    a: {interfaces: {eth0: {addresses: [10.0.0.1/24]}}}\n"
        "    b: {interfaces: {eth0: {addresses: [10.0.0.2/24]}}}\n  links:\n    - endpoints: ['a:eth0', 'b:eth0']\n"
        "checks:\n  - name: no-port\n    traffic: [{udp: {node: a, to: '10.0.0.2:9'}}]\n"
        "    expect: {drops: {NO_SOCKET: 1}}\n"
    )
    code = (
        "import sys\n"
        "from labctl.topology.loader import load_file\n"
        "from labctl.topology.model import LabFile\n"
        f"lab = load_file({str(lab)!r}, LabFile)[0]\n"
        "assert lab.checks[0].expect.drops == {'NO_SOCKET': 1}\n"
        "print(' '.join(sorted(m.rpartition('.')[2] for m in sys.modules if m.startswith('labctl.expect.kinds.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["drops"]
