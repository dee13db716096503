"""Lab topologies several test files use (the notes' VM topology, in its smallest form), and bringing one up."""

from __future__ import annotations

from pathlib import Path

VMS = """\
topology:
  nodes:
    host:
      bridges:
        br0: {ports: [tap1, tap2]}
      interfaces:
        br0: {addresses: [192.168.3.101/24]}
    vm1:
      kind: vm
      interfaces:
        eth0: {addresses: [192.168.3.102/24]}
    vm2:
      kind: vm
      interfaces:
        eth0: {addresses: [192.168.3.103/24]}
  links:
    - endpoints: ["vm1:eth0", "host:tap1"]
    - endpoints: ["vm2:eth0", "host:tap2"]
"""


def two_nodes(first: str, second: str, a: str = "client", b: str = "server") -> str:
    """Two nodes whose ``eth0`` are the two ends of one veth, with the given addresses (``10.0.97.1/24``)."""
    return f"""\
topology:
  nodes:
    {a}:
      interfaces:
        eth0: {{addresses: [{first}]}}
    {b}:
      interfaces:
        eth0: {{addresses: [{second}]}}
  links:
    - endpoints: ["{a}:eth0", "{b}:eth0"]
"""


def up_file(file: Path, lab: str, body: str) -> list[str]:
    """Write ``body`` as lab ``lab`` to ``file`` and bring it up in process; the converge changes ``up`` reported."""
    from labctl.lab import build
    from labctl.lab.labfile import load_lab

    file.write_text(f"name: {lab}\n{body}")
    topo, _ = load_lab(str(file))
    changes: list[str] = []
    build.up(topo, str(file), changes=changes)
    return changes
