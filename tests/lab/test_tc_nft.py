"""nftables and tc in lab files, on the real kernel: built in the node, converged, shown, validated."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from labctl.errors import KernelLacksError, LabFileError
from labctl.kernel import kconfig, netns, nft
from labctl.lab import build, state, status
from labctl.lab.labfile import load_lab

pytestmark = pytest.mark.skipif(not nft.can_check(), reason="needs root: namespaces")

TWO = """
topology:
  nodes:
    a:
      interfaces:
        eth0:
          addresses: [10.77.0.1/24]
{a_extra}
    b:
      interfaces:
        eth0: {{addresses: [10.77.0.2/24]}}
{b_extra}
  links:
    - endpoints: ["a:eth0", "b:eth0"]
"""
RULESET = """      nftables: |
        table inet filter {{
          chain input {{
            type filter hook input priority 0; policy accept;
            icmp type echo-request counter {verdict} comment "pings"
          }}
        }}
"""


def _write(tmp_path: Path, name: str, a_extra: str = "", b_extra: str = "") -> str:
    file = tmp_path / f"{name}.yaml"
    file.write_text(f"name: {name}\n" + TWO.format(a_extra=a_extra, b_extra=b_extra))
    return str(file)


def _up(file: str) -> None:
    topo, _ = load_lab(file)
    build.up(topo, file)


def _tc(lab: str, node: str, what: str = "qdisc") -> str:
    ns = netns.namespace_name(lab, node)
    return subprocess.run(["ip", "netns", "exec", ns, "tc", what, "show", "dev", "eth0"], text=True,
                          capture_output=True, check=True).stdout  # fmt: skip


def _ping(lab: str) -> bool:
    ns = netns.namespace_name(lab, "a")
    cmd = ["ip", "netns", "exec", ns, "ping", "-c1", "-W1", "10.77.0.2"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_nftables_converge_keeps_counters_replaces_and_removes(tmp_path: Path, lab_name: str) -> None:
    file = _write(tmp_path, lab_name, b_extra=RULESET.format(verdict=""))
    try:
        _up(file)
        assert _ping(lab_name)
        ns = netns.namespace_name(lab_name, "b")
        assert nft.counts(nft.rule_counters(ns))["pings"] == 1
        _up(file)  # the same ruleset: nothing is reloaded, the counter keeps its packet
        assert nft.counts(nft.rule_counters(ns))["pings"] == 1
        _write(tmp_path, lab_name, b_extra=RULESET.format(verdict="drop"))
        _up(file)  # changed: replaced in one transaction, counters from 0
        assert nft.counts(nft.rule_counters(ns))["pings"] == 0
        assert not _ping(lab_name)
        _write(tmp_path, lab_name)
        _up(file)  # removed from the file: removed from the node
        with netns.entered(ns):
            assert nft.tables_here() == []
        assert _ping(lab_name)
    finally:
        build.down(lab_name)


def test_legacy_qdisc_key_second_up_converges(tmp_path: Path, lab_name: str) -> None:
    """The bug of issue 11: a second up with qdisc: failed with 'File exists' and left the lab 'building'."""
    tbf = "          qdisc: {kind: tbf, limit: 3000, rate: 1mbit, burst: 1600}\n"
    file = _write(tmp_path, lab_name, a_extra=tbf)
    try:
        _up(file)
        _up(file)
        saved = state.load(lab_name)
        assert saved is not None and saved.status == "up"
        assert "tbf 1: root" in _tc(lab_name, "a")
        Path(file).write_text(Path(file).read_text().replace("rate: 1mbit", "rate: 2mbit"))
        _up(file)
        assert "rate 2Mbit" in _tc(lab_name, "a")
        _write(tmp_path, lab_name)
        _up(file)
        assert "tbf" not in _tc(lab_name, "a")
    finally:
        build.down(lab_name)


def test_tc_tree_is_built_shown_and_left_alone_when_unchanged(tmp_path: Path, lab_name: str) -> None:
    extra = """          tc:
            qdisc: {kind: htb, default: "20", classes: {"1:10": {rate: 10mbit}, "1:20": {rate: 1mbit}}}
            clsact: true
            filters:
              - {kind: u32, attach: root, match: {protocol: udp, dport: 7000}, classid: "1:10"}
              - {kind: bpf, attach: egress, match: "udp dst port 5999", action: drop}
"""
    file = _write(tmp_path, lab_name, a_extra=extra)
    try:
        _up(file)
        ns = netns.namespace_name(lab_name, "a")
        handle_before = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "filter", "show", "dev", "eth0",
                                        "egress"], text=True, capture_output=True).stdout  # fmt: skip
        _up(file)
        handle_after = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "filter", "show", "dev", "eth0",
                                       "egress"], text=True, capture_output=True).stdout  # fmt: skip
        assert "bpf" in handle_after and handle_before == handle_after
        shown = status.lab_status(lab_name)["nodes"]["a"]
        eth0 = next(i for i in shown["interfaces"] if i["name"] == "eth0")
        assert eth0["tc"]["qdiscs"] == ["htb 1: root", "clsact ffff: ingress"]
        assert eth0["tc"]["classes"] == ["htb 1:10", "htb 1:20"]
        assert eth0["tc"]["filters"] == ["u32 1: pref 1", "bpf egress pref 2"]
        json.dumps(shown)
    finally:
        build.down(lab_name)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("          tc: {qdisc: {kind: tbf, rate: 1mbt, limit: 3000}}\n", "is not a rate in tc's units"),
        ("          tc: {qdisc: {kind: tbf, rate: 1mbit, limit: 3000, delay: 10ms}}\n", "do not apply to tbf"),
        ("          tc: {filters: [{kind: bpf, attach: egress, match: 'udp', action: drop}]}\n", "needs clsact"),
        ("          tc: {qdisc: {kind: pfifo, limit: 10}, colour: red}\n", "colour"),
        (
            "          tc: {clsact: true, filters: [{kind: u32, attach: egress, match: {protocol: udp},"
            " action: {mirred: {to: eth9}}}]}\n",
            "no interface 'eth9'",
        ),
    ],
)
def test_tc_mistakes_are_file_line_errors(tmp_path: Path, lab_name: str, extra: str, message: str) -> None:
    file = _write(tmp_path, lab_name, a_extra=extra)
    with pytest.raises(LabFileError) as caught:
        load_lab(file)
    text = str(caught.value)
    assert message in text and f"{file}:9:" in text, text


def test_nft_rejection_is_nfts_message_at_the_files_line(tmp_path: Path, lab_name: str) -> None:
    bad = RULESET.format(verdict="").replace("icmp type echo-request", "icmp typo echo-request")
    file = _write(tmp_path, lab_name, b_extra=bad)
    with pytest.raises(LabFileError) as caught:
        load_lab(file)
    problem = caught.value.problems[0]
    assert problem.path == ("topology", "nodes", "b", "nftables")
    assert problem.line == 17 and "nft: Error: syntax error" in problem.message, str(problem)
    assert not netns.list_labctl(lab_name)


@pytest.mark.skipif(not kconfig.missing(["CONFIG_NET_SCH_NETEM"]), reason="this kernel has netem")
def test_a_qdisc_this_kernel_lacks_is_named_and_nothing_is_built(tmp_path: Path, lab_name: str) -> None:
    file = _write(tmp_path, lab_name, a_extra="          tc: {qdisc: {kind: netem, delay: 10ms}}\n")
    with pytest.raises(KernelLacksError) as caught:
        load_lab(file)
    assert caught.value.lacking == ["CONFIG_NET_SCH_NETEM"]
    assert "netem: this kernel lacks CONFIG_NET_SCH_NETEM" in str(caught.value)
    assert not netns.list_labctl(lab_name)


@pytest.mark.skipif(not kconfig.missing(["CONFIG_NET_SCH_NETEM"]), reason="this kernel has netem")
def test_pytest_plugin_skips_a_lab_this_kernel_cannot_build() -> None:
    """``pytest labs/`` collects such a lab's checks and skips them with the options named (no collection error)."""
    import sys

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(repo / "labs" / "tc-netem.yaml")],
        capture_output=True, text=True, timeout=120, cwd=repo,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 skipped" in result.stdout and "lacks CONFIG_NET_SCH_NETEM" in result.stdout


def test_hooks_walk_and_names_the_nft_rule_that_dropped(tmp_path: Path, lab_name: str) -> None:
    from labctl.lab.netfilter import trace_hooks

    ruleset = RULESET.format(verdict="").replace("icmp type echo-request counter ", "udp dport 5000 counter drop ")
    file = _write(tmp_path, lab_name, b_extra=ruleset)
    try:
        _up(file)
        walk = trace_hooks(lab_name, "a", "IP(dst='10.77.0.2')/UDP(dport=5000)")
        server = next(n for n in walk.nodes if n.node == "b")
        assert server.step_names()[-1] == "nft:inet:filter:input"
        assert [v.where for v in server.verdicts] == ["nft inet filter input handle 2"]
    finally:
        build.down(lab_name)


def test_ingress_qdisc_and_pfifo(tmp_path: Path, lab_name: str) -> None:
    """The older ingress qdisc takes an ingress filter; pfifo is a root qdisc of N packets."""
    extra = """          tc:
            qdisc: {kind: pfifo, limit: 50}
            ingress: true
            filters:
              - {kind: bpf, attach: ingress, match: "icmp", action: drop}
"""
    file = _write(tmp_path, lab_name, b_extra="")
    Path(file).write_text(
        Path(file)
        .read_text()
        .replace("eth0: {addresses: [10.77.0.2/24]}", "eth0:\n          addresses: [10.77.0.2/24]\n" + extra)
    )
    try:
        _up(file)
        shown = _tc(lab_name, "b")
        assert "pfifo 1: root" in shown and "limit 50p" in shown and "ingress ffff:" in shown, shown
        assert not _ping(lab_name)  # b drops the echo request as it arrives
        Path(file).write_text(Path(file).read_text().replace('match: "icmp"', 'match: "udp"'))
        _up(file)
        assert _ping(lab_name)
    finally:
        build.down(lab_name)
