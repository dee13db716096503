"""Relays found only by what root alone can make; what dead labctl processes left is reclaimed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labctl.kernel import netns, procs, registry, tracefs
from labctl.lab import clean, relay
from labctl.names import scratch_namespace_name, scratch_owner
from tests.conftest import LabFactory


def _dead_pid() -> int:
    """A pid that just exited (reuse within the test is vanishingly unlikely)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _look_alike(lab: str, user: str | None) -> subprocess.Popen[bytes]:
    """A process whose argv says it is a relay of ``lab`` -- but it is not one."""
    argv = ["/bin/sh", "-c", "sleep 30; :", "-m", relay.MODULE, "--lab", lab, "--vm", "vm1"]
    try:
        return subprocess.Popen(argv, user=user)
    except PermissionError:  # a root filesystem other users cannot enter (a 0700 chroot, as fresh-debian.sh makes)
        pytest.skip(f"user {user} cannot run /bin/sh on this root filesystem")


@pytest.mark.parametrize("user", ["nobody", None])
def test_argv_alone_never_makes_a_relay(lab_name: str, user: str | None) -> None:
    proc = _look_alike(lab_name, user)
    try:
        assert proc.pid not in relay.find()
        assert lab_name not in clean._labs_with_leftovers()
    finally:
        proc.kill()
        proc.wait()


def test_a_pidfile_for_a_non_root_process_is_not_a_relay(lab_name: str) -> None:
    proc = _look_alike(lab_name, "nobody")
    fd = registry.open_dir(relay.RELAYS_DIR)
    record = {"pid": proc.pid, "start": procs.start_time(proc.pid), "lab": lab_name, "vm": "vm1"}
    try:
        registry.write_atomically(fd, f"{proc.pid}.json", json.dumps(record))
        assert proc.pid not in relay.find()
    finally:
        proc.kill()
        proc.wait()
        relay.find()  # the process is gone: its pidfile goes too
        assert not os.path.exists(os.path.join(relay.RELAYS_DIR, f"{proc.pid}.json"))
        os.close(fd)


def test_a_pidfile_with_another_start_time_is_not_a_relay(lab_name: str) -> None:
    proc = _look_alike(lab_name, None)
    fd = registry.open_dir(relay.RELAYS_DIR)
    record = {"pid": proc.pid, "start": (procs.start_time(proc.pid) or 0) - 1, "lab": lab_name, "vm": "vm1"}
    try:
        registry.write_atomically(fd, f"{proc.pid}.json", json.dumps(record))
        assert proc.pid not in relay.find()  # a reused pid: the recorded process is gone
    finally:
        proc.kill()
        proc.wait()
        os.close(fd)


def test_a_real_relay_is_found_and_stopped(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(
        'topology:\n  nodes:\n    host: {}\n    vm1: {kind: vm}\n  links:\n    - endpoints: ["vm1:eth0", "host:tap1"]\n'
    )
    found = relay.find(lab_name)
    assert list(found.values()) == [(lab_name, "vm1")]
    (pid,) = found
    assert os.path.exists(os.path.join(relay.RELAYS_DIR, f"{pid}.json"))
    relay.stop([pid])
    assert relay.find(lab_name) == {}
    assert not os.path.exists(os.path.join(relay.RELAYS_DIR, f"{pid}.json"))


def test_scratch_namespace_names_carry_their_owner() -> None:
    name = scratch_namespace_name(1234, 99)
    assert scratch_owner(name) == 1234
    assert scratch_owner("labctl-ebdiag.1") is None and scratch_owner("labctl-lab.node") is None


def test_clean_lab_reclaims_dead_scratch_namespaces_only(lab_name: str) -> None:
    dead = scratch_namespace_name(_dead_pid(), 1)
    live = scratch_namespace_name(os.getpid(), 2)
    netns.create(dead)
    netns.create(live)
    try:
        done = clean.clean_all(lab_name)
        assert dead in done.namespaces and not netns.exists(dead)
        assert netns.exists(live)
        assert "ebdiag" not in " ".join(clean._labs_with_leftovers())
    finally:
        netns.remove(dead)
        netns.remove(live)


def test_clean_lab_reclaims_trace_instances_of_dead_processes(lab_name: str) -> None:
    instances = Path(tracefs.ensure_mounted()) / "instances"
    dead = instances / f"{tracefs.INSTANCE_PREFIX}{_dead_pid()}-0"
    dead.mkdir()
    try:
        done = clean.clean_all(lab_name)
        assert dead.name in done.trace_instances and not dead.exists()
    finally:
        if dead.exists():
            dead.rmdir()


def test_reclaim_dead_owners_touches_nothing_alive() -> None:
    live = scratch_namespace_name(os.getpid(), 3)
    netns.create(live)
    try:
        assert live not in clean.reclaim_dead_owners().namespaces
        assert netns.exists(live)
    finally:
        netns.remove(live)


_HOLDER = """
import os, sys, time
from labctl.kernel import netns, tracefs
from labctl.names import scratch_namespace_name
netns.create(scratch_namespace_name(os.getpid(), 1))
session = tracefs.TraceSession(["skb:kfree_skb"])
session.start()
print(session.name, flush=True)
time.sleep(60)
"""


def test_kill_9_of_a_tracer_and_a_diagnosis_leaves_nothing_after_clean_lab(lab_name: str) -> None:
    """A real trace session and scratch namespace, owner killed with SIGKILL: ``clean --lab`` reclaims both."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    instance = proc.stdout.readline().strip()
    scratch = scratch_namespace_name(proc.pid, 1)
    assert instance in tracefs.list_instances() and netns.exists(scratch)
    proc.kill()
    proc.wait()
    try:
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "labctl"), "clean", "--lab", lab_name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert instance not in tracefs.list_instances()
        assert not netns.exists(scratch)
    finally:
        netns.remove(scratch)
        tracefs.remove_stale_instances()


_HOOK_HOLDER = """
import sys, time
from labctl.kernel.nftrace import HookTracer
with HookTracer(sys.argv[1], tables=("filter",)):
    print("installed", flush=True)
    time.sleep(60)
"""


def test_kill_9_of_a_hook_tracer_leaves_no_rule_after_the_next_command(make_lab: LabFactory, lab_name: str) -> None:
    """A killed ``hooks`` left its NFLOG rules at the top of the lab's chains (rule numbers shifted) for good."""
    from labctl.kernel import iptables, tracerules

    make_lab('topology:\n  nodes:\n    a:\n      iptables: ["-A INPUT -p udp --dport 7 -j ACCEPT"]\n')
    namespace = netns.namespace_name(lab_name, "a")
    proc = subprocess.Popen([sys.executable, "-c", _HOOK_HOLDER, namespace], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "installed"
    assert any("NFLOG" in r.rule for r in iptables.list_rules(namespace))
    proc.kill()
    proc.wait()
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "labctl"), "status", lab_name], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rules = [(r.chain, r.position, r.rule) for r in iptables.list_rules(namespace) if r.position]
    assert rules == [("INPUT", 1, "-A INPUT -p udp -m udp --dport 7 -j ACCEPT")]
    assert tracerules._records() == [] or all(tracerules._owner_alive(r) for r in tracerules._records())


_BRIDGE_HOOK_HOLDER = """
import sys, time
from labctl.kernel.nftrace import HookTracer
with HookTracer(sys.argv[1], tables=(), bridge_tables=("filter", "nat")):
    print("installed", flush=True)
    time.sleep(60)
"""


def test_kill_9_of_a_bridge_hook_tracer_leaves_no_rule_nor_table(make_lab: LabFactory, lab_name: str) -> None:
    from labctl.kernel import ebtables

    make_lab(
        "topology:\n  nodes:\n    sw:\n      bridges: {br0: {ports: [p1]}}\n    a: {}\n"
        '  links:\n    - endpoints: ["a:eth0", "sw:p1"]\n'
    )
    namespace = netns.namespace_name(lab_name, "sw")
    assert ebtables.existing_tables(namespace) == []
    proc = subprocess.Popen([sys.executable, "-c", _BRIDGE_HOOK_HOLDER, namespace], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "installed"
    assert any("nflog" in r.rule for r in ebtables.list_rules(namespace))
    proc.kill()
    proc.wait()
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "labctl"), "status", lab_name], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert ebtables.existing_tables(namespace) == []  # the tables only the tracer made are gone with its rules
