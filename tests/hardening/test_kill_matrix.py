"""kill -9 of every command at sampled moments: the next labctl command (or ``clean --lab``) leaves nothing.

Leftovers looked for after each kill: the lab's namespaces, scratch
namespaces of dead processes, tracefs instances of dead processes, relays
and their pidfiles, state and lock files, host-wide overrides held for the
lab and the host value itself, and trace rules (NFLOG) a killed ``hooks`` put
into a lab that stays up.  Moments are delays after the command started,
sampled so that the kill lands before, during and after the command's work;
the whole matrix takes well under a minute on a quiet machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.kernel import ebtables, iptables, netns, procs, sysctl, tracefs, tracerules
from labctl.kernel.sysctl import GlobalOverrides
from labctl.lab import relay, state
from labctl.names import scratch_owner

LABCTL = os.path.join(os.path.dirname(sys.executable), "labctl")
HOST_KEY = "net.core.netdev_budget_usecs"  # host-wide; no other lab uses it, and it is set to its own value


def lab_text(name: str) -> str:
    """A lab with a bridge, a VM (relay), iptables rules, a host-wide override (at the host's own value) and a check."""
    value = sysctl.read_host(HOST_KEY)
    return f"""name: {name}
sysctls: {{{HOST_KEY}: {value}}}
topology:
  nodes:
    a:
      interfaces: {{eth0: {{addresses: [10.0.0.1/24]}}}}
      iptables: ["-A INPUT -p udp --dport 7 -j ACCEPT"]
    sw:
      bridges: {{br0: {{ports: [p1, p2]}}}}
    b:
      interfaces: {{eth0: {{addresses: [10.0.0.2/24]}}}}
    vm1:
      kind: vm
  links:
    - endpoints: ["a:eth0", "sw:p1"]
    - endpoints: ["b:eth0", "sw:p2"]
    - endpoints: ["vm1:eth0", "sw:tap1"]
checks:
  - name: reach
    traffic:
      - ping: {{node: a, to: 10.0.0.2}}
      - inject: {{node: a, packet: "IP(dst='10.0.0.2')/UDP(dport=9)", count: 3}}
    expect: {{reachable: true, drops: {{NO_SOCKET: ">=0"}}}}
"""


def host_value() -> str:
    """The host value when no lab holds an override of it ('' when one does: then it is not ours to check)."""
    return "" if GlobalOverrides.owners().get(HOST_KEY) else sysctl.read_host(HOST_KEY)


def leftovers(lab: str, host_before: str, *, lab_up: bool = False) -> list[str]:
    """Everything of ``lab`` (and of dead labctl processes) still there; with ``lab_up`` the lab itself may be."""
    found = []
    if not lab_up:
        found += [f"namespace {n}" for n in netns.list_labctl(lab)]
        found += [f"relay {pid}" for pid in relay.find(lab)]
        for suffix in (".json", ".lock"):
            if os.path.lexists(os.path.join(state.LABS_DIR, lab + suffix)):
                found.append(f"state file {lab}{suffix}")
        held = [key for key, owners in GlobalOverrides.owners().items() if f"lab:{lab}" in owners]
        found += [f"host override {key}" for key in held]
    found += [f"scratch namespace {n}" for n in netns.list_all() if (p := scratch_owner(n)) and not procs.alive(p)]
    for name in tracefs.list_instances():
        pid = tracefs.instances._instance_pid(name)
        if pid is not None and not procs.alive(pid):
            found.append(f"trace instance {name}")
    # other engineers' labs may hold the same host-wide key: its value is ours to check only when nobody does
    if not GlobalOverrides.owners().get(HOST_KEY) and host_before and sysctl.read_host(HOST_KEY) != host_before:
        found.append(f"{HOST_KEY} is {sysctl.read_host(HOST_KEY)}, was {host_before}")
    found += [f"trace-rule record {r}" for r in tracerules._records() if not tracerules._owner_alive(r)]
    if lab_up:
        for node in ("a", "b", "sw"):
            namespace = netns.namespace_name(lab, node)
            rules = [r.rule for r in iptables.list_rules(namespace)]
            found += [f"trace rule in {node}: {r}" for r in rules if "NFLOG" in r]
            bridge = [r.rule for r in ebtables.list_rules(namespace)]
            found += [f"bridge trace rule in {node}: {r}" for r in bridge if "nflog" in r]
    return found


def kill_after(argv: list[str], delay: float) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def labctl(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LABCTL, *words], capture_output=True, text=True, timeout=60)


# (command, delay): delays sample before the work, in its middle, and near its end
LIFECYCLE = [("up", d) for d in (0.15, 0.45, 0.8, 1.3)] + [("down", d) for d in (0.1, 0.3, 0.6)]
LIFECYCLE += [("run", d) for d in (0.5, 1.2, 2.0, 3.0)]


@pytest.mark.parametrize(("command", "delay"), LIFECYCLE, ids=[f"{c}-{d}s" for c, d in LIFECYCLE])
def test_kill_9_of_a_lab_command_then_down_leaves_nothing(
    command: str, delay: float, lab_name: str, tmp_path: Path
) -> None:
    host_before = host_value()
    file = tmp_path / f"{lab_name}.yaml"
    file.write_text(lab_text(lab_name))
    if command == "down":
        assert labctl("up", str(file)).returncode == 0
    kill_after([LABCTL, command, str(file) if command != "down" else lab_name], delay)
    # half the moments end with down, the other half with clean --lab: both must reclaim everything
    after = labctl("down", lab_name) if int(delay * 10) % 2 else labctl("clean", "--lab", lab_name)
    assert after.returncode in (0, 2) and "Traceback" not in after.stderr, after.stderr
    assert leftovers(lab_name, host_before) == []


@pytest.fixture(scope="module")
def up_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"t{os.getpid()}km"
    file = tmp_path_factory.mktemp("kill") / f"{name}.yaml"
    file.write_text(lab_text(name))
    assert labctl("up", str(file)).returncode == 0
    try:
        yield name
    finally:
        labctl("down", name)


PACKET = "IP(dst='10.0.0.2')/UDP(dport=9)"
TOOLS = {
    "trace": ["trace", "{lab}", "a", PACKET],
    "hooks": ["hooks", "{lab}", "a", PACKET],
    "capture": ["capture", "{lab}", "b", "--timeout", "20"],
    "listen": ["listen", "{lab}", "b", "udp", ":9", "--timeout", "20"],
    "inject": ["inject", "{lab}", "a", PACKET, "-n", "100000000", "--rate", "20000"],
}
DELAYS = {"trace": (0.5, 1.5, 2.5), "hooks": (1.0, 2.0, 3.0)}  # these two work for seconds: kill inside the work
MOMENTS = [(tool, d) for tool in TOOLS for d in DELAYS.get(tool, (0.3, 0.7, 1.2))]


@pytest.mark.parametrize(("tool", "delay"), MOMENTS, ids=[f"{t}-{d}s" for t, d in MOMENTS])
def test_kill_9_of_a_tool_then_the_next_command_leaves_nothing(tool: str, delay: float, up_lab: str) -> None:
    host_before = host_value()
    kill_after([LABCTL, *(w.format(lab=up_lab) for w in TOOLS[tool])], delay)
    after = labctl("status", up_lab)  # any next command reclaims what a dead labctl left
    assert after.returncode == 0, after.stderr
    assert leftovers(up_lab, host_before, lab_up=True) == []


def test_after_the_matrix_down_leaves_nothing(up_lab: str) -> None:
    host_before = host_value()
    assert labctl("down", up_lab).returncode == 0
    assert leftovers(up_lab, host_before) == []


def test_kill_9_of_run_j_ends_its_workers_and_down_leaves_nothing(tmp_path: Path) -> None:
    """``run -j 2`` forks its lab workers from a fork server; ``kill -9`` of labctl takes the server with it,
    and each worker, told by the kernel (PR_SET_PDEATHSIG), brings its lab down and exits -- none is left
    waiting forever for work, and ``down`` then finds nothing of either lab."""
    host_before = host_value()
    names = [f"t{os.getpid()}kj{i}" for i in range(2)]
    files = []
    for name in names:
        file = tmp_path / f"{name}.yaml"
        # without the host-wide override: a lab that sets one runs alone, and both must be at work at once
        file.write_text("\n".join(line for line in lab_text(name).splitlines() if not line.startswith("sysctls:")))
        files.append(str(file))
    errors = tmp_path / "stderr"
    with errors.open("wb") as sink:  # a file, not a pipe: a worker left alive would hold a pipe open forever
        proc = subprocess.Popen([LABCTL, "run", "-j", "2", *files], stdout=subprocess.DEVNULL, stderr=sink)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (netns.list_labctl(names[0]) and netns.list_labctl(names[1])):
        time.sleep(0.05)  # until both labs are being built: both workers are at work
    workers = procs.descendants(proc.pid)
    assert workers, "labctl run -j 2 started no worker"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(procs.alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if procs.alive(pid)], "workers outlived the run"
    assert "Traceback" not in errors.read_text(), errors.read_text()[-2000:]
    for name in names:
        after = labctl("down", name)
        assert after.returncode in (0, 2) and "Traceback" not in after.stderr, after.stderr
        assert leftovers(name, host_before) == []
