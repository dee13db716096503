"""Packet expressions: Scapy syntax, parsed without eval (no kernel needed)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from labctl.traffic.expr import ExprError, fill_defaults, parse_packet, to_bytes


def test_layers_stack_with_literal_arguments() -> None:
    pkt = parse_packet("IP(dst='10.0.0.2', ttl=3)/UDP(dport=5000)/Raw(b'hi')")
    assert (pkt[IP].dst, pkt[IP].ttl, pkt[UDP].dport, pkt[Raw].load) == ("10.0.0.2", 3, 5000, b"hi")


def test_l2_expression() -> None:
    pkt = parse_packet("Ether(dst='ff:ff:ff:ff:ff:ff')/ARP(pdst='192.168.3.1')")
    assert isinstance(pkt, Ether) and pkt[ARP].pdst == "192.168.3.1"


@pytest.mark.parametrize(
    ("expr", "load"),
    [("IP()/'abc'", b"abc"), ("IP()/b'\\x00\\x01'", b"\x00\x01"), ("IP()/Raw(b'x' * 4)", b"xxxx"), ("'hi'", b"hi")],
)
def test_bare_strings_are_raw_payloads(expr: str, load: bytes) -> None:
    assert parse_packet(expr)[Raw].load == load


def test_literal_kinds() -> None:
    pkt = parse_packet("Dot1Q(vlan=5, prio=+1, dei=False)")
    assert (pkt[Dot1Q].vlan, pkt[Dot1Q].prio, pkt[Dot1Q].dei) == (5, 1, False)
    assert parse_packet("IP(ttl=-1, src=None)")[IP].ttl == -1
    tcp = parse_packet("TCP(flags='S', options=[('MSS', 1460), ('NOP', None)])")
    assert tcp[TCP].options[0] == ("MSS", 1460)
    assert parse_packet("IP(dst=['10.0.0.1', '10.0.0.2'])")[IP].dst == ["10.0.0.1", "10.0.0.2"]
    assert parse_packet("IP(dst='10.0.0.0/30')") is not None


def test_bare_layer_name_is_a_default_layer() -> None:
    assert isinstance(parse_packet("IP/UDP")[UDP], UDP)


@pytest.mark.parametrize(
    ("expr", "message", "token", "column"),
    [
        ("__import__('os')", "not a Scapy layer", "__import__", 0),
        ("os.system('id')", "only Scapy layer names can be called", "os.system", 0),
        ("IP()/Foo()", "not a Scapy layer", "Foo", 5),
        ("IP(dst=str(1))", "only literals", "str(1)", 7),
        ("IP(dst=open('/etc/passwd').read())", "only literals", "open('/etc/passwd').read()", 7),
        ("IP().__class__", "expected a layer", "IP().__class__", 0),
        ("IP()[0]", "expected a layer", "IP()[0]", 0),
        ("[IP() for x in 'ab']", "expected a layer", "[IP() for x in 'ab']", 0),
        ("(lambda: IP())()", "only Scapy layer names can be called", "lambda: IP()", 1),
        ("IP(**{'dst': 'x'})", "'\\*\\*' is not allowed", "**{'dst': 'x'}", 3),
        ("IP(zz=1)", "IP has no field 'zz'", "zz=1", 3),
        ("IP(dst=X)", "only literals", "X", 7),
        ("IP(b'a', b'b')", "at most one positional", "b'b'", 9),
        ("IP(dst='example.com')", "host names are not resolved", "'example.com'", 7),
        ("IP() + UDP()", "expected a layer", "IP() + UDP()", 0),
        ("Raw(b'x' * 10**9)", "only literals", "10**9", 11),
        ("Raw(b'x' * 99999999)", "payload longer than", "b'x' * 99999999", 4),
        ("IP(dst=", "syntax error", "(", 2),
    ],
)
def test_rejections_point_at_the_token(expr: str, message: str, token: str, column: int) -> None:
    with pytest.raises(ExprError, match=message) as info:
        parse_packet(expr)
    assert (info.value.token, info.value.column) == (token, column)


def test_caret_marks_the_token() -> None:
    with pytest.raises(ExprError) as info:
        parse_packet("IP(dst='10.0.0.2')/Bogus(x=1)")
    assert info.value.caret() == "IP(dst='10.0.0.2')/Bogus(x=1)\n" + " " * 19 + "^^^^^"


def test_column_counts_characters_not_bytes() -> None:
    with pytest.raises(ExprError) as info:
        parse_packet("Raw('é')/Nope()")
    assert info.value.column == 9


def test_empty_and_nul() -> None:
    with pytest.raises(ExprError, match="empty"):
        parse_packet("  ")
    with pytest.raises(ExprError, match="NUL"):
        parse_packet("IP(\x00)")


def test_fill_defaults_prepends_ether_and_fills_unset_addresses() -> None:
    pkt = fill_defaults(
        parse_packet("IP(dst='10.0.0.2')/UDP()"), src_mac="02:00:00:00:00:01", dst_mac=None, src_ip="10.0.0.1"
    )
    assert isinstance(pkt, Ether)
    assert (pkt.src, pkt.dst, pkt[IP].src) == ("02:00:00:00:00:01", "ff:ff:ff:ff:ff:ff", "10.0.0.1")
    assert len(to_bytes(pkt)) == 14 + 20 + 8


def test_fill_defaults_keeps_what_the_user_wrote() -> None:
    original = parse_packet("Ether(src='02:00:00:00:00:09')/IP(src='10.9.9.9', dst='10.0.0.2')")
    pkt = fill_defaults(original, src_mac="02:00:00:00:00:01", dst_mac="02:00:00:00:00:02", src_ip="10.0.0.1")
    assert (pkt.src, pkt.dst, pkt[IP].src) == ("02:00:00:00:00:09", "02:00:00:00:00:02", "10.9.9.9")
    assert "dst" not in original.fields  # the input is not modified


def test_fill_defaults_fills_arp_sender() -> None:
    pkt = fill_defaults(
        parse_packet("ARP(pdst='10.0.0.2')"), src_mac="02:00:00:00:00:01", dst_mac=None, src_ip="10.0.0.1"
    )
    assert (pkt[ARP].hwsrc, pkt[ARP].psrc, pkt[Ether].type) == ("02:00:00:00:00:01", "10.0.0.1", 0x0806)


def test_fill_defaults_without_l2() -> None:
    pkt = fill_defaults(
        parse_packet("IP(dst='10.0.0.2')"), src_mac="02:00:00:00:00:01", dst_mac=None, src_ip="10.0.0.1", l2=False
    )
    assert isinstance(pkt, IP) and pkt.src == "10.0.0.1"


def test_to_bytes_reports_unbuildable_values() -> None:
    with pytest.raises(ExprError, match="cannot build"):
        to_bytes(parse_packet("IP(ttl=-1)"), "IP(ttl=-1)")


def test_ipv6_routes_are_read_only_for_a_packet_that_may_ask_them() -> None:
    """Reading the host's IPv6 routes cost every IPv4 packet's command 0.02 s; an IPv6 packet still has them."""
    from labctl.traffic import expr

    expr._read_ipv6_routes.cache_clear()
    parse_packet("Ether()/IP(dst='10.0.0.2')/UDP(dport=9)/Raw(b'x')")
    parse_packet("ARP(pdst='10.0.0.2')")
    assert expr._read_ipv6_routes.cache_info().misses == 0
    parse_packet("IPv6(dst='2001:db8::2')/UDP(dport=9)")
    assert expr._read_ipv6_routes.cache_info().misses == 1
