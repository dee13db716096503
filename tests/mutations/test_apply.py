"""apply() without a kernel: a stale mutation is an error, never a silent no-op."""

from __future__ import annotations

from typing import Any

import pytest

from labctl.verify.mutation import Mutation, MutationError, apply, format_path

CHECK: dict[str, Any] = {
    "name": "c",
    "setup": {"iptables": {"r1": ["-A INPUT -j DROP"]}},
    "traffic": [{"udp": {"node": "h1", "to": "10.0.0.2:8080"}}],
    "expect": {
        "counters": {"server": {"Udp.NoPorts": 1}},
        "hooks": {"r1": ["raw:PREROUTING", "mangle:FORWARD", "filter:FORWARD"]},
    },
}


def mutate(op: str, path: list[str | int], value: Any = None) -> dict[str, Any]:
    return apply(CHECK, Mutation(check="c", op=op, path=path, value=value, why="test"))  # type: ignore[arg-type]


def test_set_keeps_the_original_untouched() -> None:
    out = mutate("set", ["expect", "counters", "server", "Udp.NoPorts"], 2)
    assert out["expect"]["counters"]["server"]["Udp.NoPorts"] == 2
    assert CHECK["expect"]["counters"]["server"]["Udp.NoPorts"] == 1


@pytest.mark.parametrize(
    ("op", "path", "value"),
    [
        ("set", ["expect", "counters", "server", "Udp.InDatagrams"], 2),  # a key the check does not have
        ("set", ["expect", "hooks", "r1", 3], "x"),  # an index past the end
        ("delete", ["setup", "listen"], None),
        ("remove-item", ["setup", "iptables", "r1"], "-A INPUT -j ACCEPT"),  # the rule was rewritten
        ("replace", ["traffic", 0, "udp", "to"], {"old": ":9090", "new": ":9091"}),
        ("swap", ["expect", "hooks", "r1"], ["raw:PREROUTING", "nat:PREROUTING"]),
        ("add", ["expect", "counters", "server", "Udp.NoPorts"], 2),  # exists already: set, not add
        ("set", ["expect", "counters", "server", "Udp.NoPorts"], 1),  # no change at all
        ("reverse", ["expect", "counters"], None),  # not a list
    ],
)
def test_stale_mutations_are_errors(op: str, path: list[str | int], value: Any) -> None:
    with pytest.raises(MutationError):
        mutate(op, path, value)


def test_list_ops() -> None:
    hooks = ["expect", "hooks", "r1"]
    assert mutate("shorten", hooks)["expect"]["hooks"]["r1"] == ["raw:PREROUTING", "mangle:FORWARD"]
    assert mutate("reverse", hooks)["expect"]["hooks"]["r1"][0] == "filter:FORWARD"
    swapped = mutate("swap", hooks, ["mangle:FORWARD", "filter:FORWARD"])["expect"]["hooks"]["r1"]
    assert swapped == ["raw:PREROUTING", "filter:FORWARD", "mangle:FORWARD"]
    assert mutate("swap", hooks, [0, 2])["expect"]["hooks"]["r1"][0] == "filter:FORWARD"
    assert mutate("remove-item", ["setup", "iptables", "r1"], "-A INPUT -j DROP")["setup"]["iptables"]["r1"] == []


def test_add_creates_missing_mappings() -> None:
    out = mutate("add", ["setup", "sysctls", "r1", "net.ipv4.ip_forward"], 0)
    assert out["setup"]["sysctls"] == {"r1": {"net.ipv4.ip_forward": 0}}


def test_replace_in_a_string() -> None:
    out = mutate("replace", ["traffic", 0, "udp", "to"], {"old": ":8080", "new": ":8081"})
    assert out["traffic"][0]["udp"]["to"] == "10.0.0.2:8081"


def test_paths_print_unambiguously() -> None:
    assert format_path(["expect", "counters", "server", "Udp.NoPorts"]) == "expect.counters.server[Udp.NoPorts]"
    assert format_path(["expect", "captured", "c3:eth0"]) == "expect.captured[c3:eth0]"
