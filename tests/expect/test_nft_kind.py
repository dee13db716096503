"""The nft expectation judges recorded counter deltas only, and an nft walk step is named as the tracer names it."""

from __future__ import annotations

from labctl.evidence.model import Evidence, frozen_nested
from labctl.expect.base import JudgeContext, Needs, kinds
from labctl.expect.kinds.netfilter import full_name, step_issue
from labctl.lab.facts import machine_facts


def test_nft_counts_by_comment_and_handle() -> None:
    kind = kinds()["nft"]
    evidence = Evidence(nft=frozen_nested({"r1": {"udp-5000": 3, "inet filter input handle 4": 3}}))
    ctx = JudgeContext(traffic_protocols=frozenset())
    rows = kind.judge({"r1": {"udp-5000": 3, "inet filter input handle 4": ">=1"}}, evidence, ctx)
    assert all(r.ok for r in rows)
    rows = kind.judge({"r1": {"udp-5000": 2, "gone": 0}}, evidence, ctx)
    assert [r.ok for r in rows] == [False, False]
    assert rows[1].observed == "no such rule with a counter"


def test_nft_walk_steps() -> None:
    assert full_name("nft:inet:filter:input") == "nft:inet:filter:input"
    assert full_name("filter:INPUT") == "ip:filter:INPUT"
    facts = machine_facts()
    assert step_issue("nft:inet:filter:input", facts) is None
    assert step_issue("nft:ipx:filter:input", facts) is not None
    needs = Needs()
    kinds()["hooks"].needs({"r1": ["nft:inet:early:input", "nft:inet:late:input"]}, needs)
    assert needs.walks["r1"].nft and not needs.walks["r1"].ip  # nft only: iptables tables are not instantiated
    kinds()["hooks"].needs({"r2": ["raw:PREROUTING", "nft:inet:early:input"]}, needs)
    assert needs.walks["r2"].nft and needs.walks["r2"].ip
