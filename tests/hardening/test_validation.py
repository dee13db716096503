"""What validation must catch before anything is built, and host-wide values a second up must not flip."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labctl.errors import LabFileError
from labctl.kernel import sysctl
from labctl.lab.labfile import load_lab
from labctl.topology import loader

LABCTL = os.path.join(os.path.dirname(sys.executable), "labctl")
NODE = "name: v\ntopology:\n  nodes:\n    a:\n      sysctls: {{{sysctls}}}\n    b: {{}}\n"
NODE += '  links:\n    - endpoints: ["a:eth0", "b:eth0"]\n'


def problems_of(tmp_path: Path, text: str) -> list[str]:
    file = tmp_path / "lab.yaml"
    file.write_text(text)
    with pytest.raises(LabFileError) as info:
        load_lab(str(file))
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("sysctls", "message"),
    [
        ("net.netfilter.nf_hooks_lwtunnel: 1", "one-way switch"),
        ("net.core.netdev_max_backlog: 10", "host-wide, not per namespace"),
        ("net.ipv4.tcp_mem: '1 2 3'", "host-wide"),
        ("net.netfilter.nf_conntrack_max: 10", "host-wide"),
        ("net.ipv4.no_such_thing: 1", "no such sysctl"),
        ("net.ipv4.ip_forward: 'yes'", "takes an integer"),
        ("net.ipv4.ip_forward: 1.5", "is a decimal number"),
        ("net.ipv4.ip_forward: [1]", "is a list"),
        ("net.ipv4.ip_local_port_range: 1000", "2 integers"),
        ("net.ipv4.conf.eth9.rp_filter: 1", "no interface 'eth9'"),
        ("'net/../../../etc/x': 1", "is not a sysctl name"),
        ("kernel.panic: 1", "not a network sysctl"),
    ],
)
def test_node_sysctls_that_cannot_be_the_nodes(tmp_path: Path, sysctls: str, message: str) -> None:
    found = problems_of(tmp_path, NODE.format(sysctls=sysctls))
    assert len(found) == 1 and message in found[0], found
    assert found[0].startswith(f"{tmp_path}/lab.yaml:5: topology.nodes.a.sysctls.")


@pytest.mark.parametrize(
    "sysctls",
    [
        "net.ipv4.ip_forward: 1",
        "net.ipv4.conf.eth0.rp_filter: 2",
        "net.ipv4.neigh.eth0.retrans_time_ms: 100",
        "net.ipv4.ip_local_port_range: '2000 3000'",
        "net.ipv4.conf.all.accept_redirects: false",
    ],
)
def test_node_sysctls_a_node_may_have(tmp_path: Path, sysctls: str) -> None:
    file = tmp_path / "lab.yaml"
    file.write_text(NODE.format(sysctls=sysctls))
    load_lab(str(file))


def test_host_sysctl_value_must_parse(tmp_path: Path) -> None:
    text = "name: v\nsysctls: {net.core.netdev_max_backlog: lots}\ntopology: {nodes: {a: {}}}\n"
    found = problems_of(tmp_path, text)
    assert found == [
        f"{tmp_path}/lab.yaml:2: sysctls.net.core.netdev_max_backlog: net.core.netdev_max_backlog"
        " takes an integer (it is " + repr(sysctl.read_host("net.core.netdev_max_backlog")) + " now),"
        " not 'lots'"
    ]


def test_proc_path_never_leaves_proc_sys() -> None:
    with pytest.raises(sysctl.SysctlError):
        sysctl.proc_path("net/../../etc/shadow")


def test_a_second_up_never_flips_a_host_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """converge with the same settings writes nothing; release restores the original once."""
    kernel = {"net.core.netdev_max_backlog": "1000"}
    writes: list[tuple[str, str]] = []

    def write(key: str, value: str) -> None:
        writes.append((key, value))
        kernel[key] = value

    monkeypatch.setattr(sysctl, "GLOBALS_FILE", str(tmp_path / "reg" / "globals.json"))
    monkeypatch.setattr(sysctl, "_read_here", lambda key: kernel[key])
    monkeypatch.setattr(sysctl, "_write_here", write)
    overrides = sysctl.GlobalOverrides
    overrides.converge("lab:x", {"net.core.netdev_max_backlog": 8})
    assert writes == [("net.core.netdev_max_backlog", "8")]
    overrides.converge("lab:x", {"net.core.netdev_max_backlog": 8})  # the idempotent second up
    assert writes == [("net.core.netdev_max_backlog", "8")]
    overrides.converge("lab:x", {})  # the file no longer asks for it
    assert writes[-1] == ("net.core.netdev_max_backlog", "1000") and overrides.owners() == {}


# -- input that would exhaust the host --------------------------------------------------------------


def _bomb(levels: int = 9) -> str:
    lines = ["name: bomb", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    lines.append(f"topology: {{nodes: {{n: {{iptables: *a{levels - 1}}}}}}}")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_fails_fast_and_small(tmp_path: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    found = problems_of(tmp_path, _bomb())
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # kB
    assert len(found) == 1 and "once aliases are expanded" in found[0] and ":7: " in found[0]


@pytest.mark.parametrize(("depth", "message"), [(100, "nested deeper than 64 levels"), (100_000, "nesting depth")])
def test_deep_nesting_is_refused(tmp_path: Path, depth: int, message: str) -> None:
    found = problems_of(tmp_path, "name: d\ntopology: " + "[" * depth + "]" * depth + "\n")
    assert len(found) == 1 and message in found[0] and ":2: " in found[0]


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    found = problems_of(tmp_path, "name: r\ntopology: &t {nodes: *t}\n")
    assert len(found) == 1 and "refers to itself" in found[0]


def test_a_large_file_is_refused_before_parsing(tmp_path: Path) -> None:
    text = "name: big\ntopology: {nodes: {a: {}}}\n" + "".join(f"k{i}: 1\n" for i in range(500_000))
    assert len(text) > loader.MAX_FILE_BYTES
    found = problems_of(tmp_path, text)
    assert len(found) == 1 and "too large for a lab file" in found[0]


def _up(file: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LABCTL, "up", file], capture_output=True, text=True, timeout=30)


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "lab.yaml"
    os.mkfifo(fifo)
    result = _up(str(fifo))
    assert result.returncode == 2 and "not a regular file" in result.stderr and "Traceback" not in result.stderr


def test_a_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "lab.yaml"
    link.symlink_to("/dev/zero")
    result = _up(str(link))
    assert result.returncode == 2 and "not a regular file" in result.stderr


def test_a_directory_is_refused(tmp_path: Path) -> None:
    result = _up(str(tmp_path))
    assert result.returncode == 2 and "a directory" in result.stderr and "Traceback" not in result.stderr


def test_non_utf8_names_its_line(tmp_path: Path) -> None:
    file = tmp_path / "lab.yaml"
    file.write_bytes(b"name: x\ntopology:\n  nodes: {a\xff: {}}\n")
    result = _up(str(file))
    assert result.returncode == 2 and f"{file}:3: " in result.stderr and "not UTF-8" in result.stderr


def test_a_file_that_is_not_a_lab_is_not_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("".join(f"user{i}:$6$secret{i}:19000:0:99999:7:::\n" for i in range(50)))
    link = tmp_path / "lab.yaml"
    link.symlink_to(secret)
    result = _up(str(link))
    assert result.returncode == 2 and "not a lab file" in result.stderr
    assert "secret" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_problems_are_capped_and_one_line_each(tmp_path: Path) -> None:
    nodes = "".join(f"    n{i}: {{colour{i}: red}}\n" for i in range(200))
    found = problems_of(tmp_path, f"name: c\ntopology:\n  nodes:\n{nodes}")
    assert len(found) == loader.MAX_PROBLEMS and "more problems" in found[-1]
    assert all("\n" not in p for p in found)


def test_control_characters_are_escaped_in_messages(tmp_path: Path) -> None:
    found = problems_of(tmp_path, 'name: c\ntopology:\n  nodes:\n    "a\\e[2J": {}\n')
    assert all("\x1b" not in p for p in found) and any("\\x1b" in p for p in found)


def test_loader_is_fast_at_1000_nodes() -> None:
    n = 1000
    lines = ["name: big", "topology:", "  nodes:", "    host:", "      bridges:"]
    ports = ", ".join(f"v{i}" for i in range(n))
    lines.append(f"        br0: {{ports: [{ports}]}}")
    for i in range(n):
        lines.append(f"    h{i}:\n      interfaces:\n        eth0: {{addresses: [10.{i // 250}.{i % 250}.2/8]}}")
    lines.append("  links:")
    lines += [f'    - endpoints: ["h{i}:eth0", "host:v{i}"]' for i in range(n)]
    start = time.monotonic()
    topo = loader.parse_topology("\n".join(lines) + "\n", "big.yaml")
    assert time.monotonic() - start < 3  # 10 s before the link index
    assert len(topo.link_interfaces("host")) == n


def test_xtables_offer_reads_this_kernels_lists() -> None:
    from labctl.kernel import xtables

    targets, matches = xtables.offer("target"), xtables.offer("match")
    with open(xtables.PROC_LISTS["ip"]["target"]) as f:
        listed = {line.strip() for line in f}
    assert targets.known and targets.listed == listed
    assert targets.has("LOG") and matches.has("udp") and matches.has("state")
    assert not targets.has("CLUSTERIP_NOT_A_TARGET") and not matches.has("nosuch")
    assert targets.suggestion("masquerde") == "MASQUERADE"


def test_a_modular_kernel_may_load_what_it_does_not_list() -> None:
    from labctl.kernel.xtables import Offer

    offer = Offer("target", frozenset({"LOG"}), frozenset({"CLUSTERIP"}), known=True)
    assert offer.has("CLUSTERIP") and not offer.has("LED")
    assert Offer("match", frozenset(), frozenset(), known=False).has("anything")  # cannot see: refuse nothing


def test_a_chain_the_node_creates_is_a_target(tmp_path: Path) -> None:
    text = 'name: v\ntopology:\n  nodes:\n    a:\n      iptables: ["-N mine", "-A INPUT -j mine", "-A INPUT -g mine"]\n'
    file = tmp_path / "lab.yaml"
    file.write_text(text)
    load_lab(str(file))


def test_validate_prints_control_characters_escaped(tmp_path: Path) -> None:
    """``validate`` printed keys raw: a node named ESC[2J cleared the terminal of whoever checked the file."""
    file = tmp_path / "esc.yaml"
    file.write_text('name: esc\ntopology:\n  nodes:\n    "\\e[2Jevil": {}\n')
    result = subprocess.run([LABCTL, "validate", str(file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "\x1b" not in result.stdout + result.stderr and "\\x1b[2Jevil" in result.stdout, result.stdout


def test_ip6tables_on_a_kernel_without_it_is_not_provable_or_must_be_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's ip6tables: makes the lab SKIP with the options named; a check's own rules must be required."""
    from labctl.errors import KernelLacksError, LabFileError
    from labctl.kernel import kconfig

    have = {k: v for k, v in (kconfig.options() or {}).items() if not k.startswith("CONFIG_IP6_NF_")}
    monkeypatch.setattr(kconfig, "options", lambda: have)
    node = tmp_path / "node.yaml"
    node.write_text('name: v\ntopology:\n  nodes:\n    a:\n      ip6tables: ["-t raw -A PREROUTING -p udp"]\n')
    with pytest.raises(KernelLacksError) as lacks:
        load_lab(str(node))
    assert lacks.value.lacking == ["CONFIG_IP6_NF_IPTABLES", "CONFIG_IP6_NF_RAW"]
    check = (
        "name: v\ntopology:\n  nodes:\n    a: {}\nchecks:\n  - name: c\nREQUIRES    setup:\n"
        '      ip6tables: {a: ["-A INPUT -p udp --dport 53 -j DROP"]}\n'
        "    traffic: [{ping: {node: a, to: 127.0.0.1}}]\n    expect: {reachable: true}\n"
    )
    file = tmp_path / "check.yaml"
    file.write_text(check.replace("REQUIRES", ""))
    with pytest.raises(LabFileError) as bad:
        load_lab(str(file))
    assert "ip6tables table filter: this kernel lacks CONFIG_IP6_NF_IPTABLES, CONFIG_IP6_NF_FILTER" in str(bad.value)
    file.write_text(check.replace("REQUIRES", "    requires: [CONFIG_IP6_NF_IPTABLES, CONFIG_IP6_NF_FILTER]\n"))
    load_lab(str(file))  # required: the check is reported not provable here when run


IP6_EXPECT = """\
name: v
topology:
  nodes:
    a: {ipv6: true}
checks:
  - name: counted
REQUIRES_0    traffic: [{ping: {node: a, to: "::1"}}]
    expect:
      ip6tables: {a: {"filter:OUTPUT:policy": 1}}
  - name: walked
REQUIRES_1    traffic: [{ping: {node: a, to: "::1"}}]
    expect:
      hooks: {a: [ip6:raw:OUTPUT, ip6:mangle:OUTPUT, ip6:filter:OUTPUT]}
"""


def test_ip6tables_expectations_on_a_kernel_without_it_must_be_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ip6tables: counter or an ip6: walk step needs ip6tables like a check's setup rules do: refused at load
    time (file:line, key path, exit 2) unless the check says so in requires:, never an ERROR when it runs."""
    from typer.testing import CliRunner

    from labctl.cli import app
    from labctl.kernel import kconfig

    have = {k: v for k, v in (kconfig.options() or {}).items() if k not in ("CONFIG_IP6_NF_IPTABLES",
                                                                             "CONFIG_IP6_NF_RAW")}
    monkeypatch.setattr(kconfig, "options", lambda: have)
    file = tmp_path / "ip6.yaml"
    file.write_text(IP6_EXPECT.replace("REQUIRES_0", "").replace("REQUIRES_1", ""))
    with pytest.raises(LabFileError) as bad:
        load_lab(str(file))
    assert [str(p) for p in bad.value.problems] == [
        f"{file}:9: checks[0].expect.ip6tables.a.filter:OUTPUT:policy: ip6tables table filter: this kernel lacks"
        " CONFIG_IP6_NF_IPTABLES; a check that needs it says so (requires: [CONFIG_IP6_NF_IPTABLES]) and is then"
        " not provable here",
        f"{file}:13: checks[1].expect.hooks.a: ip6tables table raw: this kernel lacks CONFIG_IP6_NF_IPTABLES,"
        " CONFIG_IP6_NF_RAW; a check that needs it says so (requires: [CONFIG_IP6_NF_IPTABLES, CONFIG_IP6_NF_RAW])"
        " and is then not provable here",
        f"{file}:13: checks[1].expect.hooks.a: ip6tables table mangle: this kernel lacks CONFIG_IP6_NF_IPTABLES;"
        " a check that needs it says so (requires: [CONFIG_IP6_NF_IPTABLES]) and is then not provable here",
        f"{file}:13: checks[1].expect.hooks.a: ip6tables table filter: this kernel lacks CONFIG_IP6_NF_IPTABLES;"
        " a check that needs it says so (requires: [CONFIG_IP6_NF_IPTABLES]) and is then not provable here",
    ]
    result = CliRunner().invoke(app, ["validate", str(file)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{file}:9: checks[0].expect.ip6tables" in result.output
    file.write_text(
        IP6_EXPECT.replace("REQUIRES_0", "    requires: [CONFIG_IP6_NF_IPTABLES]\n").replace(
            "REQUIRES_1", "    requires: [CONFIG_IP6_NF_IPTABLES, CONFIG_IP6_NF_RAW]\n"
        )
    )
    load_lab(str(file))  # required: each check is reported not provable here when run
