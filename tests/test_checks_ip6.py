"""IPv6 and the udp/ping options, route and conntrack entries: schema, validation and judges, without root."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6

from labctl.errors import LabFileError
from labctl.evidence.model import Evidence
from labctl.expect.base import JudgeContext
from labctl.kernel.counters import parse_snmp6
from labctl.lab.labfile import load_lab
from labctl.topology.checks import Check, Ping, SendUdp
from labctl.traffic.expr import fill_defaults, parse_packet
from labctl.verify.judge import judge

TOPOLOGY = """\
topology:
  nodes:
    v4:
      interfaces:
        eth0: {addresses: [10.0.0.1/24]}
    v6:
      ipv6: true
      dad: false
      interfaces:
        eth0: {addresses: [10.0.0.2/24, "2001:db8::2/64"]}
  links:
    - endpoints: ["v4:eth0", "v6:eth0"]
"""


def problems(tmp_path: Path, checks: str, topology: str = TOPOLOGY) -> list[str]:
    file = tmp_path / "lab.yaml"
    file.write_text(f"name: ip6unit\n{topology}checks:\n{checks}")
    with pytest.raises(LabFileError) as info:
        load_lab(str(file))
    return [str(p) for p in info.value.problems]


def test_snmp6_lines_are_named_like_snmp() -> None:
    text = "Ip6InReceives                   \t12\nIcmp6OutPktTooBigs 1\nUdplite6InDatagrams 3\nUdp6NoPorts 4\n"
    assert parse_snmp6(text) == {
        "Ip6.InReceives": 12,
        "Icmp6.OutPktTooBigs": 1,
        "Udplite6.InDatagrams": 3,  # not Udp6.
        "Udp6.NoPorts": 4,
    }


def test_udp_ipv6_destination_is_bracketed_and_parsed() -> None:
    step = SendUdp(node="a", to="[2001:db8::1]:5000", gso_size=1400, size=14000, df=True)
    assert (step.host, step.port) == ("2001:db8::1", 5000)
    with pytest.raises(ValueError, match=r"\[ADDRESS\]:PORT"):
        SendUdp(node="a", to="2001:db8::1:5000")
    with pytest.raises(ValueError, match="segments per send"):
        SendUdp(node="a", to="10.0.0.1:5000", size=65000, gso_size=100)


def test_ping_options_make_the_command_line() -> None:
    ping = Ping(node="a", to="10.0.0.255", count=3, size=1472, df=True, ttl=1, broadcast=True, interval=0.2)
    assert ping.argv() == [
        "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-s", "1472", "-M", "do", "-t", "1", "-b", "10.0.0.255"
    ]


def test_wrong_family_and_bad_ports_are_errors_before_building(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
  - name: c
    setup:
      listen: [{node: v4, port: 5, address: "::"}, {node: v6, port: 6, address: 10.0.0.9}]
    traffic:
      - udp: {node: v4, to: "[2001:db8::2]:5000"}
      - ping: {node: v6, to: "2001:db8:1::1", ttl: 1}
    expect: {delivered: 0}
""",
    )
    text = "\n".join(found)
    assert "listen[0].address: :: is an IPv6 address but node v4 has IPv6 off" in text
    assert "listen[1].address: node v6 has no address 10.0.0.9" in text
    assert "traffic[0].udp.to: 2001:db8::2 is an IPv6 address but node v4 has IPv6 off" in text
    assert not any("traffic[1]" in p for p in found)  # a routed IPv6 destination is fine
    assert all(line.startswith(str(tmp_path / "lab.yaml") + ":") for line in found)
    ports = problems(tmp_path, "  - name: c\n    traffic: [{udp: {node: v6, to: '[2001:db8::1]:70000'}}]\n"
                               "    setup: {listen: [{node: v6, port: 0}]}\n    expect: {delivered: 0}\n")
    assert any("traffic[0].udp: 'to' must be ADDRESS:PORT" in p for p in ports)
    assert any("listen[0].port: Input should be greater than or equal to 1" in p for p in ports)


def test_ipv6_destination_without_ipv6_address_or_route(tmp_path: Path) -> None:
    topology = TOPOLOGY.replace(', "2001:db8::2/64"', "")
    found = problems(tmp_path, "  - name: c\n    traffic: [{ping: {node: v6, to: '2001:db8::9'}}]\n"
                               "    expect: {reachable: true}\n", topology)
    assert any("2001:db8::9 is IPv6 but node v6 has no IPv6 address or route" in p for p in found)


def test_ipv6_address_needs_ipv6_on(tmp_path: Path) -> None:
    topology = TOPOLOGY.replace("      ipv6: true\n      dad: false\n", "")
    found = problems(tmp_path, "  - name: c\n    expect: {delivered: 0}\n", topology)
    assert any("is an IPv6 address but node v6 has IPv6 off" in p for p in found)


def test_route_and_conntrack_references(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
  - name: c
    expect:
      route: {v4: {"10.0.0.2": {dev: eth9}, "10.0.0.3": {}}, nobody: {"10.0.0.2": {mtu: 1400}}}
      conntrack: {entries: [{node: v4, status: [ASURED]}, {node: ghost}]}
""",
    )
    text = "\n".join(found)
    assert "route.v4.10.0.0.2.dev: node v4 has no interface 'eth9'" in text
    assert "route.v4.10.0.0.3: state at least one of" in text
    assert "route.nobody: unknown node 'nobody'" in text
    assert "no conntrack status 'ASURED' (did you mean ASSURED?)" in text
    assert "entries.1.node: unknown node 'ghost'" in text or "entries[1].node: unknown node 'ghost'" in text


def _check(expect: dict[str, object]) -> Check:
    return Check.model_validate({"name": "c", "expect": expect})


ROUTES = Evidence(
    routes=MappingProxyType(
        {
            "h1 10.0.2.2": MappingProxyType(
                {"dst": "10.0.2.2", "type": "unicast", "dev": "eth0", "via": "10.0.1.1", "src": "10.0.1.2",
                 "mtu": 1400, "error": None}
            ),
            "h1 2001:db8::2": MappingProxyType(
                {"dst": "2001:db8::2", "type": "unicast", "dev": "eth0", "via": None, "src": "2001:db8::1",
                 "mtu": None, "error": None}
            ),
        }
    )
)


def test_route_judge_compares_each_stated_field() -> None:
    good = _check({"route": {"h1": {"10.0.2.2": {"dev": "eth0", "via": "10.0.1.1", "src": "10.0.1.2", "mtu": 1400},
                                     "2001:db8:0::2": {"via": "none", "mtu": "none", "src": "2001:db8::1"}}}})
    assert all(r.ok for r in judge(good, ROUTES, JudgeContext()))
    for wrong in ({"mtu": 1500}, {"mtu": "none"}, {"via": "10.0.1.9"}, {"dev": "eth1"}, {"error": "ENETUNREACH"}):
        rows = judge(_check({"route": {"h1": {"10.0.2.2": wrong}}}), ROUTES, JudgeContext())
        assert not all(r.ok for r in rows), wrong
    missing = judge(_check({"route": {"h1": {"10.0.2.9": {"mtu": "none"}}}}), ROUTES, JudgeContext())
    assert [r.observed for r in missing] == ["not looked up"] and not missing[0].ok


ENTRY = {
    "proto": "udp", "src": "10.0.1.2", "dst": "10.0.2.2", "sport": 40000, "dport": 8704, "reply_src": "10.0.2.2",
    "reply_dst": "10.0.2.1", "reply_sport": 8704, "reply_dport": 40000, "state": None, "zone": 0,
    "status": ["SEEN_REPLY", "SRC_NAT", "CONFIRMED"], "mark": 0,
}
CONNTRACK = Evidence(conntrack=1, conntrack_entries=MappingProxyType({"r1": (MappingProxyType(ENTRY),)}))


def test_conntrack_entries_match_by_tuple_state_zone_and_status() -> None:
    def ok(expect: object) -> bool:
        return all(r.ok for r in judge(_check({"conntrack": expect}), CONNTRACK, JudgeContext()))

    assert ok(1) and not ok(2)  # the count form of existing labs
    assert ok({"total": 1, "entries": [{"node": "r1", "proto": "udp", "dst": "10.0.2.2", "dport": 8704,
                                        "reply_dst": "10.0.2.1", "zone": 0, "status": ["SRC_NAT"]}]})
    assert ok({"entries": [{"node": "r1", "dport": 8705, "count": 0}]})  # absent
    assert not ok({"entries": [{"node": "r1", "dport": 8704, "count": 0}]})
    assert not ok({"entries": [{"node": "r1", "reply_dst": "10.0.2.2"}]})  # not masqueraded
    assert not ok({"entries": [{"node": "r1", "zone": 1}]})
    assert not ok({"entries": [{"node": "r1", "status": ["ASSURED"]}]})
    assert not ok({"entries": [{"node": "r1", "proto": "tcp", "state": "ESTABLISHED"}]})
    assert not ok({"entries": [{"node": "h1", "proto": "udp"}]})


def test_inject_fills_the_ipv6_source() -> None:
    pkt = fill_defaults(parse_packet("IPv6(dst='2001:db8::2')/UDP(dport=5000)"), src_mac="02:00:00:00:00:01",
                        dst_mac="02:00:00:00:00:02", src_ip="2001:db8::1")
    assert pkt[IPv6].src == "2001:db8::1" and pkt.dst == "02:00:00:00:00:02" and pkt[UDP].dport == 5000
    kept = fill_defaults(parse_packet("IPv6(src='2001:db8::7', dst='2001:db8::2')"), src_mac="02:00:00:00:00:01",
                         dst_mac=None, src_ip="2001:db8::1")
    assert kept[IPv6].src == "2001:db8::7"


def test_group_and_link_local_next_hop_macs() -> None:
    from labctl.lab.traffic import eui64_mac, multicast_mac

    assert multicast_mac("ff02::1") == "33:33:00:00:00:01"
    assert multicast_mac("ff02::1:ff00:2") == "33:33:ff:00:00:02"
    assert multicast_mac("224.0.0.251") == "01:00:5e:00:00:fb"
    assert multicast_mac("239.255.1.2") == "01:00:5e:7f:01:02"
    assert multicast_mac("10.0.0.1") is None
    assert eui64_mac("fe80::ff:fe00:1") == "02:00:00:00:00:01"
    assert eui64_mac("fe80::1") is None and eui64_mac("2001:db8::ff:fe00:1") is None


def test_unknown_snmp6_counter_is_an_error_with_the_closest_names(tmp_path: Path) -> None:
    found = problems(tmp_path, "  - name: c\n    expect: {counters: {v6: {Ip6.InRecieves: 1, Udp6.NoPorts: 1}}}\n")
    assert len(found) == 1
    assert "expect.counters.v6.Ip6.InRecieves: no counter 'Ip6.InRecieves' in this kernel" in found[0]
    assert "did you mean Ip6.InReceives" in found[0]


def test_listen_may_bind_a_group_or_the_subnet_broadcast(tmp_path: Path) -> None:
    file = tmp_path / "lab.yaml"
    file.write_text(
        f"name: ip6unit\n{TOPOLOGY}checks:\n  - name: c\n    setup:\n"
        "      listen: [{node: v4, port: 5, address: 10.0.0.255},"
        " {node: v4, port: 6, address: 224.0.0.251}, {node: v6, port: 7, address: 'ff02::fb'},"
        " {node: v6, port: 8, address: '2001:db8::2'}]\n    expect: {delivered: 0}\n"
    )
    load_lab(str(file))  # no problem
