"""Traffic descriptions: packets written by users in Scapy syntax, never eval'd."""

from labctl.traffic.expr import ExprError, fill_defaults, parse_packet, to_bytes

__all__ = ["ExprError", "fill_defaults", "parse_packet", "to_bytes"]
