"""The iptables rule parser and builder, without the kernel.

``parse_rule`` is pure; ``build_rule`` without a table only loads the
userspace extension libraries (libxt_*.so) -- the test checks that it never
opened a table through python-iptables' global cache (which would
instantiate tables in the caller's namespace, here the root one).
"""

from __future__ import annotations

import iptc
import pytest

from labctl.kernel.iptables import RuleError, build_rule, parse_rule, tokenize


def test_tokenize_keeps_offsets_of_quoted_words() -> None:
    text = "-A OUTPUT -m comment --comment 'two words' -j ACCEPT"
    tokens = tokenize(text)
    assert [t.value for t in tokens][4:6] == ["--comment", "two words"]
    assert text[tokens[5].offset :].startswith("'two words'")


def test_nat_masquerade() -> None:
    rule = parse_rule("-t nat -A POSTROUTING -o eth1 -j MASQUERADE")
    assert (rule.table, rule.command, rule.chain) == ("nat", "append", "POSTROUTING")
    assert rule.out_interface == "eth1"
    assert rule.target is not None and rule.target.name == "MASQUERADE"
    assert rule.matches == ()


def test_implicit_protocol_match() -> None:
    rule = parse_rule("-A INPUT -p udp --dport 5000 -j DROP")
    assert rule.protocol == "udp"
    (match,) = rule.matches
    assert match.name == "udp" and match.implicit
    assert [(o.name, o.values) for o in match.options] == [("dport", ("5000",))]


def test_explicit_match_after_protocol_is_the_same_match() -> None:
    rule = parse_rule("-A INPUT -p udp -m udp --dport 53 -j ACCEPT")
    assert [m.name for m in rule.matches] == ["udp"]


def test_options_belong_to_the_latest_match_or_target() -> None:
    rule = parse_rule("-t nat -A PREROUTING -d 10.0.0.1 -p tcp --dport 80 -j DNAT --to-destination 10.0.1.2:8080")
    assert rule.destination == "10.0.0.1"
    assert [m.name for m in rule.matches] == ["tcp"]
    assert rule.target is not None
    assert [(o.name, o.values) for o in rule.target.options] == [("to-destination", ("10.0.1.2:8080",))]
    mark = parse_rule("-t mangle -A PREROUTING -j MARK --set-mark 7")
    assert mark.target is not None and mark.target.options[0].name == "set-mark"


def test_physdev_and_flag_options() -> None:
    rule = parse_rule("-A FORWARD -m physdev --physdev-in vc1 --physdev-is-bridged -j DROP")
    (match,) = rule.matches
    assert [(o.name, o.values) for o in match.options] == [
        ("physdev-in", ("vc1",)),
        ("physdev-is-bridged", ()),
    ]


def test_negations_new_and_old_syntax() -> None:
    rule = parse_rule("-A INPUT ! -s 10.0.0.0/8 -p udp -m mark --mark 7 ! --dport 53 -j RETURN")
    assert rule.source == "!10.0.0.0/8"
    (mark,) = rule.matches  # --dport is parsed into mark's context; build_rule moves it
    assert mark.options[0].values == ("7",) and not mark.options[0].inverted
    assert (mark.options[1].name, mark.options[1].inverted) == ("dport", True)
    old = parse_rule("-A INPUT -p tcp --dport ! 22 -i ! eth0 -j DROP")
    assert old.matches[0].options[0].inverted
    assert old.in_interface == "!eth0"


def test_policy_new_chain_insert_goto() -> None:
    assert parse_rule("-P FORWARD DROP").policy == "DROP"
    assert parse_rule("-N MYCHAIN").command == "new-chain"
    insert = parse_rule("-I INPUT 2 -i eth0 -j ACCEPT")
    assert (insert.command, insert.position) == ("insert", 2)
    goto = parse_rule("-A FORWARD -g MYCHAIN")
    assert goto.target is not None and goto.target.goto


@pytest.mark.parametrize(
    ("text", "bad", "reason"),
    [
        ("-A INPUT --dport 5000 -j DROP", "--dport", "belongs to no match"),
        ("-t nosuch -A INPUT -j DROP", "nosuch", "unknown table"),
        ("-A INPUT -p udp --dport 1 -j DROP extra", "extra", "unexpected word"),
        ("-P FORWARD MAYBE", "MAYBE", "policy"),
        ("-A INPUT -j DROP -j ACCEPT", "-j", "only one target"),
        ("-A INPUT -s", "-s", "needs an argument"),
        ("-j DROP", "-j", "no command"),
        ("-A INPUT ! -j DROP", "!", "cannot negate"),
    ],
)
def test_errors_point_at_the_bad_word(text: str, bad: str, reason: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    error = info.value
    assert reason in error.reason
    assert error.token == bad
    assert error.offset is not None and text[error.offset :].startswith(bad)
    assert error.namespace is None
    caret_line = str(error).splitlines()[1]
    first_line = str(error).splitlines()[0]
    assert first_line[caret_line.index("^") :].startswith(bad)


def test_unbalanced_quote() -> None:
    with pytest.raises(RuleError, match="cannot split"):
        parse_rule("-A INPUT -m comment --comment 'open -j ACCEPT")


def test_build_rule_uses_no_kernel_table() -> None:
    before = dict(iptc.Table._cache)
    rule = build_rule(parse_rule("-A INPUT -p udp --dport 5000 -j NFLOG --nflog-prefix x"))
    build_rule(parse_rule("-A INPUT -j SOMECHAIN"))  # a jump: no table asked
    assert rule.protocol == "udp"
    assert iptc.Table._cache == before


def test_build_rule_falls_back_to_protocol_match() -> None:
    rule = build_rule(parse_rule("-A INPUT -p udp -m mark --mark 7 --dport 53 -j ACCEPT"))
    assert sorted(m.name for m in rule.matches) == ["mark", "udp"]


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("-A INPUT -m nosuchmatch -j DROP", "nosuchmatch"),
        ("-A INPUT -p udp --dport notaport -j DROP", "--dport"),
        ("-A INPUT -m mark --nosuchoption 1 -j DROP", "--nosuchoption"),
        ("-t mangle -A PREROUTING -j MARK --set-mark x", "--set-mark"),
    ],
)
def test_build_errors_name_the_word(text: str, bad: str) -> None:
    with pytest.raises(RuleError) as info:
        build_rule(parse_rule(text))
    assert info.value.token == bad


# ebtables lines share the tokenizer and RuleError


def test_ebtables_parse_and_restore_script() -> None:
    from labctl.kernel import ebtables

    rules = [
        ebtables.parse_rule("-t filter -A FORWARD -s 02:00:00:00:00:01 -j DROP"),
        ebtables.parse_rule("-P FORWARD DROP"),
        ebtables.parse_rule("-t nat -I PREROUTING 1 --nflog-group 5 --nflog-prefix 'a b' -j CONTINUE"),
        ebtables.parse_rule("-N LAB"),
    ]
    assert (rules[0].table, rules[0].command, rules[0].chain) == ("filter", "append", "FORWARD")
    assert rules[2].position == 1
    script = ebtables.build_script(rules)
    assert script.lines == [
        "*filter",
        ":FORWARD DROP",
        ":LAB RETURN",
        "-A FORWARD -s 02:00:00:00:00:01 -j DROP",
        "*nat",
        '-I PREROUTING 1 --nflog-group 5 --nflog-prefix "a b" -j CONTINUE',
    ]
    assert script.origin[3] is rules[0]


@pytest.mark.parametrize(
    ("text", "bad"),
    [("-t bogus -A FORWARD -j DROP", "bogus"), ("-P FORWARD MAYBE", "MAYBE"), ("-j DROP", "-j")],
)
def test_ebtables_errors_point_at_the_word(text: str, bad: str) -> None:
    from labctl.kernel import ebtables

    with pytest.raises(RuleError) as info:
        ebtables.parse_rule(text)
    assert info.value.token == bad


def test_ebtables_save_rows() -> None:
    from labctl.kernel import ebtables

    rows = ebtables.parse_save(
        "# Generated by ebtables-nft-save\n*filter\n:INPUT ACCEPT\n:FORWARD DROP\n"
        "[3:126] -A FORWARD -s 02:00:00:00:00:01 -j DROP\n[0:0] -A FORWARD -j ACCEPT\n"
    )
    assert [(r.chain, r.position, r.packets, r.policy) for r in rows] == [
        ("INPUT", 0, -1, "ACCEPT"),
        ("FORWARD", 0, -1, "DROP"),
        ("FORWARD", 1, 3, None),
        ("FORWARD", 2, 0, None),
    ]
    assert rows[2].rule == "-A FORWARD -s 02:00:00:00:00:01 -j DROP" and rows[2].bytes == 126
