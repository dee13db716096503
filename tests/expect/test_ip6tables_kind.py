"""ip6tables counters and ip6: walk steps are judged on recorded evidence only; IPv6 walks split per packet."""

from __future__ import annotations

from labctl.evidence.model import Evidence, frozen_nested, step_as_dict, step_from_dict
from labctl.evidence.netfilter import is_trace_rule, walks_per_packet
from labctl.expect.base import JudgeContext, Needs, kinds
from labctl.expect.kinds.netfilter import full_name, step_issue
from labctl.kernel.iptrules import RuleCounter
from labctl.kernel.nftrace import HookStep
from labctl.lab.facts import machine_facts

CTX = JudgeContext(traffic_protocols=frozenset())


def test_ip6tables_counts_come_from_the_ip6tables_evidence_only() -> None:
    kind = kinds()["ip6tables"]
    evidence = Evidence(
        rules=frozen_nested({"h2": {"filter:INPUT:1": 7}}),
        ip6tables=frozen_nested({"h2": {"filter:INPUT:1": 1, "filter:INPUT:policy": 0}}),
    )
    rows = kind.judge({"h2": {"filter:INPUT:1": 1, "filter:INPUT:policy": 0}}, evidence, CTX)
    assert all(r.ok for r in rows)
    assert rows[0].what == "h2 ip6tables filter:INPUT:1 packets (delta)"
    rows = kind.judge({"h2": {"filter:INPUT:1": 7, "filter:FORWARD:1": 0}}, evidence, CTX)
    assert [r.ok for r in rows] == [False, False]  # the IPv4 rule's 7 is not the IPv6 rule's count
    assert rows[1].observed == "no such rule"
    ipv4 = kinds()["rules"].judge({"h2": {"filter:INPUT:1": 1}}, evidence, CTX)
    assert not ipv4[0].ok  # and the other way round


def test_ip6tables_keys_are_checked_against_the_tables() -> None:
    kind = kinds()["ip6tables"]
    facts = machine_facts()
    assert kind.machine({"h2": {"filter:INPUT:1": 1, "raw:PREROUTING:policy": 0}}, facts) == []
    problems = kind.machine({"h2": {"broute:BROUTING:1": 1, "raw:INPUT:policy": 0}}, facts)
    assert [p[1] for p in problems] == [
        "ip6tables has no table 'broute' (raw, mangle, nat, filter, security)",
        "raw has no built-in chain 'INPUT'",
    ]


def test_ip6_walk_steps() -> None:
    facts = machine_facts()
    assert full_name("ip6:filter:INPUT") == "ip6:filter:INPUT"
    assert step_issue("ip6:filter:INPUT", facts) is None
    assert "ip6 has no traceable table" in (step_issue("ip6:nope:INPUT", facts) or "")
    assert "no built-in chain" in (step_issue("ip6:raw:FORWARD", facts) or "")
    needs = Needs()
    kinds()["hooks"].needs({"r1": ["ip6:raw:PREROUTING", "ip6:filter:INPUT"]}, needs)
    assert needs.walks["r1"].ip6 and not needs.walks["r1"].ip  # IPv6 only: iptables tables are not instantiated
    kinds()["hooks"].needs({"r2": ["raw:PREROUTING", "ip6:raw:PREROUTING"]}, needs)
    assert needs.walks["r2"].ip6 and needs.walks["r2"].ip


def _step(table: str, chain: str, seq: int, flow: int | None = None, ip_id: int | None = None) -> HookStep:
    family = "ip6" if flow is not None else "ip"
    return HookStep(family, table, chain, seq, None, None, 0, ip_id=ip_id, flow=flow)


def test_identical_ipv6_packets_of_one_flow_are_split_where_a_hook_comes_round_again() -> None:
    """Two datagrams of one flow share a flow label: the second starts where raw PREROUTING repeats."""
    chains = [("raw", "PREROUTING"), ("mangle", "PREROUTING"), ("filter", "FORWARD")]
    steps = [_step(t, c, i, flow=0xABCDE) for i, (t, c) in enumerate(chains + chains)]
    steps.append(_step("raw", "PREROUTING", 10, ip_id=77))  # an IPv4 packet between them keeps its own walk
    walks = walks_per_packet(reversed(steps))  # kernel order comes from seq, not arrival
    assert [[s.name for s in w] for w in walks] == [
        ["ip6:raw:PREROUTING", "ip6:mangle:PREROUTING", "ip6:filter:FORWARD"],
        ["ip6:raw:PREROUTING", "ip6:mangle:PREROUTING", "ip6:filter:FORWARD"],
        ["ip:raw:PREROUTING"],
    ]
    other_flow = [_step("raw", "PREROUTING", 0, flow=1), _step("raw", "PREROUTING", 1, flow=2)]
    assert len(walks_per_packet(other_flow)) == 2


def test_a_step_keeps_its_flow_label_through_the_golden_form() -> None:
    step = _step("filter", "INPUT", 3, flow=0x12345)
    assert step_from_dict(step_as_dict(step)) == step
    old = step_as_dict(_step("filter", "INPUT", 3, ip_id=5))
    del old["flow"]  # evidence recorded before IPv6 walks existed
    assert step_from_dict(old).flow is None


def test_ip6_trace_rules_are_not_the_users() -> None:
    row = RuleCounter("filter", "INPUT", 1, '-A INPUT -j NFLOG --nflog-prefix "lt0a1b2c|ip6|filter|INPUT"', 0, 0)
    assert is_trace_rule(row)


def test_a_family_mix_up_is_named_in_the_hint() -> None:
    """IPv6 traffic expected on iptables counters or walks: the FAIL says which key sees it."""
    ipv6 = JudgeContext(traffic_protocols=frozenset({0x86DD}))
    ipv4 = JudgeContext(traffic_protocols=frozenset({0x0800}))
    evidence = Evidence(ip6tables=frozen_nested({"h2": {"filter:INPUT:1": 1}}))
    (row,) = kinds()["rules"].judge({"h2": {"filter:INPUT:1": 1}}, evidence, ipv6)
    assert not row.ok and "expect ip6tables:" in row.hint
    (row,) = kinds()["ip6tables"].judge({"h2": {"filter:INPUT:1": 2}}, evidence, ipv4)
    assert "expect rules:" in row.hint
    (row,) = kinds()["ip6tables"].judge({"h2": {"filter:INPUT:1": 2}}, evidence, ipv6)
    assert row.hint == ""  # the right family, a wrong count: nothing to say about families
    (walk,) = kinds()["hooks"].judge({"h2": ["raw:PREROUTING"]}, Evidence(), ipv6)
    assert not walk.ok and "ip6:TABLE:CHAIN" in walk.hint
    (walk,) = kinds()["hooks"].judge({"h2": ["ip6:raw:PREROUTING"]}, Evidence(), ipv4)
    assert "TABLE:CHAIN; ip6tables never sees it" in walk.hint
