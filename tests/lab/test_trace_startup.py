"""A one-packet ``labctl trace`` as a new process loads only the parts of the lab file's model it uses.

Real kernel: the lab is up and the packet is traced; what is checked besides the verdict is which of
labctl's model modules the process imported (timings are bench/bench_cli.py's, never asserted here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import LabFactory
from tests.lab.test_trace import CLOSED, REPO, pair

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and tracefs")

CHECKS = """\
checks:
  - name: closed-port
    traffic: [{udp: {node: client, to: "10.0.0.2:5999"}}]
    expect: {drops: {NO_SOCKET: 1}}
"""

TRACE = """\
import sys
sys.argv = ['labctl', *sys.argv[1:]]
from labctl.cli import main
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
watched = ('labctl.topology.checks', 'labctl.expect.kinds.')
print('imported:', *sorted(m for m in sys.modules if m.startswith(watched)), file=sys.stderr)
"""


@ROOT
@pytest.mark.parametrize(
    ("checks", "imported"),
    [("", []), (CHECKS, ["labctl.expect.kinds.drops", "labctl.topology.checks"])],
    ids=["no-checks", "one-kind"],
)
def test_trace_imports_only_the_check_model_the_file_uses(
    make_lab: LabFactory, lab_name: str, checks: str, imported: list[str]
) -> None:
    make_lab(pair() + checks)
    done = subprocess.run(
        [sys.executable, "-c", TRACE, "trace", lab_name, "client", CLOSED, "--json"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sent"] == 1 and result["packets"], result  # traced (its verdict is test_trace.py's)
    assert done.stderr.strip().splitlines()[-1].split() == ["imported:", *imported]
