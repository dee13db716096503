"""status on the real kernel: what the kernel has now (a device deleted by hand is missing), the summary of a
big lab with its --all / --node, and the forked readers of big labs giving what one process reads."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import pytest
from typer.testing import CliRunner

from labctl.cli import app, render
from labctl.kernel import netns, nft
from labctl.lab import status

pytestmark = pytest.mark.skipif(not nft.can_check(), reason="needs root: namespaces")

STAR = """
topology:
  nodes:
    sw:
      bridges:
        br0: {ports: [p0, p1, p2]}
    h0:
      interfaces:
        eth0: {addresses: [10.81.0.1/24]}
    h1:
      interfaces:
        eth0: {addresses: [10.81.0.2/24]}
    h2:
      interfaces:
        eth0: {addresses: [10.81.0.3/24]}
  links:
    - endpoints: ["h0:eth0", "sw:p0"]
    - endpoints: ["h1:eth0", "sw:p1"]
    - endpoints: ["h2:eth0", "sw:p2"]
"""


def _ip(lab: str, node: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns.namespace_name(lab, node), *args], check=True)


def test_a_device_deleted_by_hand_is_missing_and_one_set_down_is_down(make_lab: Any, lab_name: str) -> None:
    make_lab(STAR)
    whole = status.lab_status(lab_name)
    assert whole["state"] == "up" and whole["missing_interfaces"] == []
    _ip(lab_name, "h1", "link", "del", "eth0")  # a veth: its bridge port sw:p1 goes with it
    _ip(lab_name, "h2", "link", "set", "eth0", "down")
    shown = status.lab_status(lab_name)
    assert shown["state"] == "incomplete"
    assert shown["missing_interfaces"] == ["h1:eth0", "sw:p1"]
    assert [i["name"] for i in shown["nodes"]["h1"]["interfaces"]] == ["lo"]
    assert shown["nodes"]["sw"]["bridges"] == {"br0": ["p0", "p2"]}
    h2 = next(i for i in shown["nodes"]["h2"]["interfaces"] if i["name"] == "eth0")
    assert h2["up"] is False and h2["peer"] == "sw:p2"
    out = CliRunner().invoke(app, ["status", lab_name], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "incomplete" in out.output and "missing interfaces: h1:eth0, sw:p1" in out.output


def test_a_big_lab_is_summarised_with_what_is_wrong_and_all_or_node_show_every_row(
    make_lab: Any, lab_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_lab(STAR)
    _ip(lab_name, "h2", "link", "set", "eth0", "down")
    monkeypatch.setattr(render, "SUMMARY_ABOVE", 2)  # four nodes count as big
    runner = CliRunner()
    summary = runner.invoke(app, ["status", lab_name], env={"COLUMNS": "200"}).output
    assert "4 nodes, 11 interfaces (1 bridge, 4 loopback, 6 veth)" in summary
    assert "down: h2:eth0 (peer sw:p2)" in summary and "no-carrier: sw:p2" in summary
    assert f"labctl status {lab_name} --all" in summary and "--node NODE" in summary
    assert "10.81.0.1/24" not in summary
    every = runner.invoke(app, ["status", lab_name, "--all"], env={"COLUMNS": "200"}).output
    assert all(f"10.81.0.{i}/24" in every for i in (1, 2, 3)) and "summarised (" not in every
    row = next(line.split() for line in every.splitlines() if line.startswith("h0 ") and " eth0 " in line)
    assert row == ["h0", "eth0", "veth", "up", "sw:p0", row[5], "1500", "10.81.0.1/24"]  # into a pipe: one line a row
    some = runner.invoke(app, ["status", lab_name, "--node", "h0"], env={"COLUMNS": "200"}).output
    assert "10.81.0.1/24" in some and "10.81.0.2/24" not in some
    unknown = runner.invoke(app, ["status", lab_name, "--node", "nope"])
    assert unknown.exit_code == 2 and "has no node nope" in unknown.output
    assert runner.invoke(app, ["status", "--node", "h0"]).exit_code == 2  # --node needs a LAB


class _FailingMarshal:
    """A forked reader that cannot send its share (the parent then reads that share itself)."""

    loads = staticmethod(__import__("marshal").loads)

    @staticmethod
    def dumps(value: object) -> bytes:
        raise RuntimeError("reader failed")


def _without_counters(nodes: dict[str, Any]) -> dict[str, Any]:
    for info in nodes.values():
        for iface in info["interfaces"]:
            iface.pop("stats")
    return nodes


def test_forked_readers_read_what_one_process_reads(
    make_lab: Any, lab_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if threading.active_count() > 1:
        pytest.skip("this pytest process runs threads: status reads in one process then (no fork)")
    make_lab(STAR)
    namespaces = netns.list_labctl(lab_name)
    alone = _without_counters(status.read_nodes(namespaces))  # 4 nodes: below PARALLEL_ABOVE, no fork
    forks: list[int] = []
    real_fork = status._fork_reader
    monkeypatch.setattr(status, "_fork_reader", lambda *args: forks.append(1) or real_fork(*args))
    monkeypatch.setattr(status, "PARALLEL_ABOVE", 1)
    monkeypatch.setattr(status.os, "sched_getaffinity", lambda pid: {0, 1})  # two cores, as CI has
    heaviest = {netns.namespace_name(lab_name, "sw"): 4}
    split = status.read_nodes(namespaces, heaviest)
    assert forks == [1]
    assert list(split) == ["h0", "h1", "h2", "sw"]  # the order of one reader, whoever read which
    assert _without_counters(split) == alone
    monkeypatch.setattr(status, "marshal", _FailingMarshal)  # the reader takes batches, then cannot hand them back
    read_here: list[str] = []
    real_read = status._read_share

    def slow_read(batch: list[str]) -> dict[str, Any]:  # a batch takes long enough for the reader to take some
        time.sleep(0.05)
        read_here.extend(batch)  # in this process only: the reader's list is its own copy
        return real_read(batch)

    monkeypatch.setattr(status, "_read_share", slow_read)
    assert _without_counters(status.read_nodes(namespaces, heaviest)) == alone and forks == [1, 1]
    assert sorted(read_here) == sorted(namespaces)  # what the failed reader took was read here again
