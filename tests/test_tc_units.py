"""tc's units and the shape of tc/nft keys, without a kernel."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from labctl.kernel import tc as ktc
from labctl.topology import nft, tc


@pytest.mark.parametrize(
    ("text", "bytes_per_second"),
    [
        ("1mbit", 125_000),
        ("500kbit", 62_500),
        ("1gbit", 125_000_000),
        ("8bit", 1),
        ("1kbps", 1000),
        ("1mibit", 131_072),
    ],
)
def test_rates_are_tcs(text: str, bytes_per_second: int) -> None:
    assert tc.parse_rate(text) == bytes_per_second


@pytest.mark.parametrize(
    ("text", "size"), [("1600b", 1600), ("32kb", 32768), ("1k", 1024), ("1mb", 1 << 20), ("1500", 1500)]
)
def test_sizes_are_tcs(text: str, size: int) -> None:
    assert tc.parse_size(text) == size


@pytest.mark.parametrize(("text", "usec"), [("10ms", 10_000), ("1s", 1_000_000), ("250us", 250), ("0.5ms", 500)])
def test_times_are_tcs(text: str, usec: int) -> None:
    assert tc.parse_time(text) == usec


@pytest.mark.parametrize("bad", ["1mbt", "fast", "0mbit", "", 100, "-1kbit"])
def test_a_rate_that_does_not_parse_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        tc.parse_rate(bad)


def test_filters_need_their_hook_and_kind_specific_shape() -> None:
    with pytest.raises(ValidationError, match="needs clsact"):
        tc.TcConfig(filters=[{"kind": "bpf", "attach": "egress", "match": "udp", "action": "drop"}])
    with pytest.raises(ValidationError, match="tcpdump expression"):
        tc.TcConfig(clsact=True, filters=[{"kind": "bpf", "attach": "egress", "match": {"protocol": "udp"},
                                           "action": "drop"}])  # fmt: skip
    with pytest.raises(ValidationError, match="not among the classes"):
        tc.Qdisc(kind="htb", default="30", classes={"1:10": {"rate": "1mbit"}})


def test_requirements_name_every_option() -> None:
    config = tc.TcConfig(
        qdisc=tc.Qdisc(kind="netem", delay="10ms"),
        clsact=True,
        filters=[
            {"kind": "u32", "attach": "egress", "match": {"protocol": "udp"}, "action": "drop"},
            {"kind": "bpf", "attach": "ingress", "match": "udp", "action": "drop"},
        ],
    )
    options = [option for _, _, option in tc.requirements(config)]
    assert options == [
        "CONFIG_NET_SCH_NETEM",
        "CONFIG_NET_SCH_INGRESS",
        "CONFIG_NET_CLS_U32",
        "CONFIG_NET_ACT_GACT",
        "CONFIG_NET_CLS_BPF",
    ]  # fmt: skip  (a bpf verdict needs no action module)


def test_u32_keys_and_bpf_verdicts() -> None:
    assert ktc.u32_keys("udp", None, "10.0.0.2", None, 5000) == [
        "0x00110000/0x00ff0000+8", "0x0a000002/0xffffffff+16", "0x00001388/0x0000ffff+20",
    ]  # fmt: skip
    program = ktc.bpf_program("udp dst port 5999", ktc.TC_ACT_SHOT)
    returns = {k for code, _, _, k in program if code == ktc.BPF_RET_K}
    assert returns == {ktc.TC_ACT_SHOT, ktc.TC_ACT_UNSPEC}


def test_nft_ruleset_shapes_and_families() -> None:
    text = nft._ruleset(["add table ip6 t", "add chain ip6 t c"])
    assert text == "add table ip6 t\nadd chain ip6 t c\n"
    assert nft.requirements("table inet filter {\n}\ntable netdev x {\n}\n") == [
        "CONFIG_NF_TABLES", "CONFIG_NF_TABLES_INET", "CONFIG_NF_TABLES_NETDEV",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        nft._ruleset("   ")


def test_nft_include_is_refused() -> None:
    """nft would read any host file as root and quote it in its error messages."""
    with pytest.raises(ValueError, match="include is not allowed"):
        nft._ruleset('include "/etc/shadow"\n')
    with pytest.raises(ValueError, match="include is not allowed"):
        nft._ruleset(["add table ip t", ' include "/etc/passwd"'])
    assert nft._ruleset('add rule ip t c meta mark 1 comment "include me"')  # a word in a string is fine


# TCA_OPTIONS of `tc filter add dev lo ingress protocol ip pref 1 flower ip_proto udp dst_ip 10.0.0.2
# dst_port 5000 action drop` (iproute2 6.1, captured with strace on a kernel without flower: the request is
# the same whether the kernel takes it or not)
TC_FLOWER_OPTIONS = bytes.fromhex(
    "050009001100000008000c000a00000208000d00ffffffff060015001388000030000300"
    "2c0001000900010067616374000000001c00028018000200000000000000000002000000"
    "000000000000000008001600000000000600080008000000"
)


def _attrs(data: bytes) -> dict[int, bytes]:
    import struct

    found, offset = {}, 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def test_flower_is_encoded_as_tc_encodes_it() -> None:
    from pyroute2.netlink.rtnl.tcmsg import tcmsg

    from labctl.kernel import tc_flower

    tc_flower.register()
    params = tc_flower.get_parameters(
        {"protocol": 0x0800, "ip_proto": "udp", "dst": "10.0.0.2", "dport": 5000,
         "action": {"kind": "gact", "action": "drop"}}
    )  # fmt: skip
    msg = tcmsg()
    msg["attrs"] = [["TCA_KIND", "flower"], ["TCA_OPTIONS", params]]
    msg.encode()
    ours = _attrs(_attrs(bytes(msg.data[16 + 20 :]))[2])
    assert ours == _attrs(TC_FLOWER_OPTIONS)  # the same attributes and values (tc orders them differently)


# TCA_OPTIONS of `tc qdisc add dev lo root handle 1: netem ...` (iproute2 6.1, captured with strace)
TC_NETEM_OPTIONS = {
    "400ms": ({"kind": "netem", "delay": "400ms"}, "105e5f00e803000000000000000000000000000000000000"),
    "loss": ({"kind": "netem", "loss": "100%"}, "00000000e8030000ffffffff000000000000000000000000"),
    "rate": (
        {"kind": "netem", "delay": "10ms", "jitter": "1ms", "rate": "1mbit"},
        "5a620200e8030000000000000000000000000000093d00001400060048e80100000000000000000000000000",
    ),
}


@pytest.mark.parametrize("case", sorted(TC_NETEM_OPTIONS))
def test_netem_is_encoded_as_tc_encodes_it(case: str) -> None:
    from pyroute2.netlink.rtnl.tcmsg import sched_netem, tcmsg

    from labctl.kernel import tc_flower
    from labctl.lab.tc import qdisc_params

    spec, expected = TC_NETEM_OPTIONS[case]
    msg = tcmsg()
    msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", sched_netem.get_parameters(qdisc_params(tc.Qdisc(**spec)))]]
    msg.encode()
    assert _attrs(bytes(msg.data[16 + 20 :]))[2].hex() == expected
    tc_flower.register()  # and a netem rate is not also sent as the generic TCA_RATE (pyroute2 0.9.7 fails on it)
    request = {"kind": "netem", "rate": 125000}
    sched_netem.fix_request(request)  # type: ignore[attr-defined]
    assert "rate" not in request
