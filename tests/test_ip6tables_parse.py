"""ip6tables rules without the kernel: parsed and built for NFPROTO_IPV6, and the tracer's IPv6 match.

Building with no table only loads libxtables extensions for IPv6 (libip6t_*,
libxt_*): python-iptables' global Table6 cache must stay untouched (it would
instantiate ip6tables tables in the root namespace).
"""

from __future__ import annotations

import iptc
import pytest

from labctl.kernel.iptables import RuleError, build_rule, parse_rule
from labctl.kernel.nftrace import ebtables_match, ip6_match


def test_icmpv6_implies_the_icmp6_match() -> None:
    for protocol in ("icmpv6", "ipv6-icmp", "58"):
        rule = parse_rule(f"-A INPUT -p {protocol} --icmpv6-type echo-request -j DROP", "ip6")
        assert rule.family == "ip6"
        (match,) = rule.matches
        assert match.name == "icmp6" and match.implicit


def test_icmp_options_belong_to_ipv4_only() -> None:
    with pytest.raises(RuleError, match=r"belongs to no match.*icmpv6"):
        parse_rule("-A INPUT -p icmp --icmp-type 8 -j DROP", "ip6")
    assert parse_rule("-A INPUT -p icmp --icmp-type 8 -j DROP").matches[0].name == "icmp"


def test_build_ipv6_rules_offline() -> None:
    before = dict(iptc.Table6._cache)
    rule = build_rule(parse_rule("-A INPUT -s 2001:db8::1 -p ipv6-icmp --icmpv6-type echo-request -j DROP", "ip6"))
    assert isinstance(rule, iptc.Rule6)
    assert rule.protocol == "icmpv6" and rule.src.startswith("2001:db8::1/")
    nflog = build_rule(parse_rule('-I INPUT 1 -p udp -j NFLOG --nflog-group 7 --nflog-prefix "lt|ip6|x"', "ip6"))
    assert nflog.target.name == "NFLOG"
    jump = build_rule(parse_rule("-A FORWARD -j mychain", "ip6"))  # no extension of that name: a user chain
    assert jump.target.name == "mychain"
    assert iptc.Table6._cache == before


def test_ipv4_addresses_are_refused_in_ip6tables() -> None:
    with pytest.raises(RuleError, match=r"bad value '10\.0\.0\.1'"):
        build_rule(parse_rule("-A INPUT -s 10.0.0.1 -j DROP", "ip6"))


def test_the_trace_match_for_ip6tables() -> None:
    assert ip6_match("-p udp --dport 5000") == "-p udp --dport 5000"
    assert ip6_match("-p icmp") == "-p icmpv6 --icmpv6-type echo-request"
    assert ip6_match("-p tcp -d 10.0.0.1 --dport 80") == "-p tcp --dport 80"
    assert ip6_match("-d 2001:db8::2 -m comment --comment 'two words'") == (
        "-d 2001:db8::2 -m comment --comment 'two words'"
    )
    assert ip6_match("") == ""


def test_the_bridge_trace_match_for_ipv6_frames() -> None:
    assert ebtables_match("-p udp --dport 5000", "ip6") == "-p IPv6 --ip6-proto udp --ip6-dport 5000"
    assert ebtables_match("-p icmp", "ip6") == "-p IPv6 --ip6-proto ipv6-icmp --ip6-icmp-type echo-request"
    assert ebtables_match("-p tcp -d 10.0.0.1", "ip6") == "-p IPv6 --ip6-proto tcp"
    assert ebtables_match("-p udp --dport 53") == "-p IPv4 --ip-proto udp --ip-dport 53"


_BOTH_FAMILIES = """
import sys
from labctl.kernel.iptables import build_rule, parse_rule
order = sys.argv[1].split(",")
rules = {"ip": "-t nat -A POSTROUTING -o eth1 -j MASQUERADE", "ip6": "-t nat -A POSTROUTING -o eth1 -j MASQUERADE"}
for family in order:
    built = build_rule(parse_rule(rules[family], family=family))
    assert built.target.name == "MASQUERADE", (family, built.target.name)
    built = build_rule(parse_rule("-A INPUT -m conntrack --ctstate NEW -j REDIRECT", family=family))
print("ok")
"""


@pytest.mark.parametrize("order", ["ip,ip6,ip", "ip6,ip,ip6"])
def test_one_process_builds_both_families_of_a_shared_extension(order: str) -> None:
    """libxt_NAT.so serves both families; the family that loaded it first used to keep it (python-iptables #316).

    Seen in ``labctl run labs/``: ip6t-filter's IPv6 MASQUERADE, then nat's IPv4
    MASQUERADE was "can't find target" for the rest of the run.  A fresh process,
    since the library state is per process.
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BOTH_FAMILIES, order], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
