"""Packets written in Scapy syntax, parsed safely.

Lab files and the CLI let users describe a frame the way they would in a
Scapy shell, ``IP(dst='10.0.0.2')/UDP(dport=5000)/Raw(b'hi')``.  Handing that
string to ``eval`` would let a lab file run any code as root, so it is parsed
with :mod:`ast` and only a tiny grammar is accepted:

* calls of Scapy layer classes, looked up by name in Scapy's own layer
  registry (``conf.layers``) -- no other names, attributes, subscripts,
  comprehensions, lambdas or function calls;
* arguments that are literals: str, bytes, int, float, bool, None, negative
  numbers, ``b'x' * 100`` repetition, and lists/tuples of those; keywords
  must be fields of the layer, and address fields take addresses, not names;
* layers joined with ``/``; a bare string or bytes literal is a ``Raw`` payload.

Errors carry the offending token and its column so a caller can draw a caret.
"""

from __future__ import annotations

import ast
import functools
import ipaddress
from typing import Any

from scapy.config import conf as scapy_conf
from scapy.fields import IP6Field, IPField
from scapy.packet import Packet, Raw

# Scapy reads the host's IPv4 routing table when its layers are imported (about 0.1 s of every
# command that builds a packet).  It says nothing about a lab node -- fill_defaults sets IPv4
# sources from the lab -- so it is not read.  IPv6's is read, but only for a packet with a layer
# beyond Ethernet/ARP/IPv4 (_with_ipv6_routes): an IPv6 packet from a node without an IPv6 address
# still takes its source from Scapy, which warns when it has no route at all; reading the table on
# import cost an IPv4 packet 0.02 s of CPU.
scapy_conf.route_autoload = False
scapy_conf.route6_autoload = False

_NO_IPV6_ROUTES_NEEDED = frozenset({"scapy.packet", "scapy.layers.l2", "scapy.layers.inet"})
"""Modules whose layers never ask Scapy's IPv6 routes (Raw, Ethernet, ARP, IPv4, ICMP, UDP, TCP)."""

_MAX_TOKEN = 40
_LITERAL_TYPES = (str, bytes, int, float, bool, type(None))
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
MAX_REPEAT = 1 << 20  # bytes; a frame is at most 64 KiB, this only stops memory bombs


class ExprError(ValueError):
    """A packet expression is invalid; points at the token that is wrong."""

    def __init__(self, message: str, *, expr: str, token: str, column: int, lineno: int = 1) -> None:
        self.message = message
        self.expr = expr
        self.token = token
        self.column = column  # 0-based character column within line ``lineno``
        self.lineno = lineno
        super().__init__(f"{message}: {token!r} (column {column + 1})")

    def caret(self) -> str:
        """The offending source line with ``^`` under the token, for terminals."""
        lines = self.expr.splitlines() or [""]
        line = lines[min(self.lineno, len(lines)) - 1]
        width = max(1, min(len(self.token), len(line) - self.column))
        return f"{line}\n{' ' * self.column}{'^' * width}"


def _registered() -> dict[str, type[Packet]]:
    from scapy.config import conf

    return {
        cls.__name__: cls
        for cls in conf.layers
        if isinstance(cls, type) and issubclass(cls, Packet) and not cls.__name__.startswith("_")
    }


@functools.cache
def common_layers() -> dict[str, type[Packet]]:
    """Ethernet, ARP, IPv4/IPv6, ICMP, UDP, TCP: what nearly every lab packet is made of.

    Loading every Scapy layer costs about 0.3 s, a third of a one-packet
    ``labctl trace``; the full registry is loaded only for a name not here.
    """
    import scapy.layers.inet
    import scapy.layers.inet6
    import scapy.layers.l2  # noqa: F401

    return _registered()


@functools.cache
def layer_registry() -> dict[str, type[Packet]]:
    """Every Scapy layer class by name, from the registry Scapy fills on import.

    Importing ``scapy.layers.all`` loads the layers listed in
    ``conf.load_layers``; each Packet subclass registers itself in
    ``conf.layers``.  Only those classes may be called from an expression.
    """
    import scapy.layers.all  # noqa: F401  (fills conf.layers)

    return _registered()


def find_layer(name: str) -> type[Packet] | None:
    return common_layers().get(name) or layer_registry().get(name)


class _Parser:
    """Walks the AST of one expression; every rejection names its node."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.lines = expr.splitlines() or [""]

    def error(self, message: str, node: ast.AST) -> ExprError:
        lineno = getattr(node, "lineno", 1)
        byte_col = getattr(node, "col_offset", 0)
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        # ast columns count UTF-8 bytes; callers draw carets in characters.
        column = len(line.encode()[:byte_col].decode(errors="ignore"))
        token = ast.get_source_segment(self.expr, node) or line[column:]
        token = token.splitlines()[0] if token else token
        return ExprError(message, expr=self.expr, token=token[:_MAX_TOKEN], column=column, lineno=lineno)

    def packet(self, node: ast.AST) -> Packet:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left, right = self.packet(node.left), self.packet(node.right)
            try:
                return left / right
            except Exception as exc:  # scapy refuses some stackings
                raise self.error(f"cannot stack layers ({exc})", node) from exc
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            return Raw(load=node.value)
        if isinstance(node, ast.Name):
            return self.construct(self.layer(node), None, {}, node)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.error("expected a layer such as IP(...), a string payload, or '/'", node)

    def layer(self, node: ast.AST) -> type[Packet]:
        if not isinstance(node, ast.Name):
            raise self.error("only Scapy layer names can be called", node)
        cls = find_layer(node.id)
        if cls is None:
            raise self.error("not a Scapy layer", node)
        return cls

    def call(self, node: ast.Call) -> Packet:
        cls = self.layer(node.func)
        if len(node.args) > 1:
            raise self.error("a layer takes at most one positional argument (its raw bytes)", node.args[1])
        raw: bytes | None = None
        for arg in node.args:
            value = self.literal(arg)
            if not isinstance(value, (str, bytes)):
                raise self.error("the positional argument must be str or bytes", arg)
            raw = value.encode() if isinstance(value, str) else value
        fields = {f.name: f for f in cls.fields_desc}
        kwargs: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.error("'**' is not allowed", kw)
            if kw.arg not in fields:
                raise self.error(f"{cls.__name__} has no field {kw.arg!r}", kw)
            value = self.literal(kw.value)
            if _is_address_field(fields[kw.arg]) and not _all_addresses(value):
                raise self.error("not an IP address or network (host names are not resolved)", kw.value)
            kwargs[kw.arg] = value
        return self.construct(cls, raw, kwargs, node)

    def construct(self, cls: type[Packet], raw: bytes | None, kwargs: dict[str, Any], node: ast.AST) -> Packet:
        """Instantiate the layer; ``raw`` bytes are dissected as Scapy does for ``IP(b'...')``."""
        try:
            return cls(raw, **kwargs) if raw is not None else cls(**kwargs)
        except Exception as exc:  # bad field values surface here
            raise self.error(f"{cls.__name__}: {exc}", node) from exc

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, _LITERAL_TYPES):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = node.operand
            if (
                isinstance(operand, ast.Constant)
                and isinstance(operand.value, (int, float))
                and not isinstance(operand.value, bool)
            ):
                return -operand.value if isinstance(node.op, ast.USub) else operand.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return self.repeated(node)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.literal(elt) for elt in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        raise self.error("only literals (str, bytes, numbers, bool, None, lists, tuples) are allowed", node)

    def repeated(self, node: ast.BinOp) -> str | bytes:
        """``b'x' * 100`` (or ``100 * b'x'``): the usual way to pad a payload."""
        left, right = self.literal(node.left), self.literal(node.right)
        if isinstance(left, int) and not isinstance(left, bool):
            left, right = right, left
        if not isinstance(left, (str, bytes)) or isinstance(right, bool) or not isinstance(right, int):
            raise self.error("'*' repeats a str or bytes literal by an integer", node)
        if len(left) * right > MAX_REPEAT:
            raise self.error(f"payload longer than {MAX_REPEAT} bytes", node)
        return left * right


def _is_address_field(field: Any) -> bool:
    """True when ``field`` (possibly wrapped by Emph/Conditional/MultipleType) holds an IP.

    Scapy resolves a host name given to such a field with the *host's* DNS
    resolver at construction time; a lab expression must not do that.
    """
    pending = [field]
    while pending:
        current = pending.pop()
        if isinstance(current, (IPField, IP6Field)):
            return True
        pending.extend(getattr(current, attr) for attr in ("fld", "dflt") if hasattr(current, attr))
        pending.extend(alt[0] if isinstance(alt, tuple) else alt for alt in getattr(current, "flds", []))
    return False


def _all_addresses(value: Any) -> bool:
    """Every string in ``value`` is an IP address or network (Scapy expands networks)."""
    if isinstance(value, (list, tuple)):
        return all(_all_addresses(item) for item in value)
    if not isinstance(value, str):
        return True  # None / ints: left to Scapy
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def parse_packet(expr: str) -> Packet:
    """Build the Scapy packet described by ``expr`` without evaluating it."""
    text = expr.strip()
    if not text:
        raise ExprError("empty packet expression", expr=expr, token="", column=0)
    if "\x00" in text:
        raise ExprError("NUL character in expression", expr=text, token="\x00", column=text.index("\x00"))
    try:
        tree = ast.parse(text, mode="eval")
    except RecursionError as exc:
        raise ExprError("expression nested too deeply", expr=text, token=text[:1], column=0) from exc
    except SyntaxError as exc:
        lineno = exc.lineno or 1
        column = max(0, (exc.offset or 1) - 1)
        token = (exc.text or text).rstrip("\n")[column : column + 1]
        raise ExprError(f"syntax error ({exc.msg})", expr=text, token=token, column=column, lineno=lineno) from exc
    try:
        return _with_ipv6_routes(_Parser(text).packet(tree.body))
    except RecursionError as exc:
        raise ExprError("expression nested too deeply", expr=text, token=text[:1], column=0) from exc


def _with_ipv6_routes(pkt: Packet) -> Packet:
    """``pkt``, after Scapy's IPv6 routes are read if one of its layers may ask them (as on import before)."""
    if any(layer.__module__ not in _NO_IPV6_ROUTES_NEEDED for layer in pkt.layers()):
        _read_ipv6_routes()
    return pkt


@functools.cache
def _read_ipv6_routes() -> None:
    import scapy.layers.inet6  # noqa: F401  (creates conf.route6)

    scapy_conf.route6.resync()


def to_bytes(pkt: Packet, expr: str = "") -> bytes:
    """Serialise ``pkt``; a field value Scapy cannot encode becomes an ExprError."""
    try:
        return bytes(pkt)
    except Exception as exc:  # scapy raises many types while building
        raise ExprError(f"cannot build packet ({exc})", expr=expr, token=expr, column=0) from exc


def fill_defaults(
    pkt: Packet,
    *,
    src_mac: str,
    dst_mac: str | None,
    src_ip: str | None,
    l2: bool = True,
) -> Packet:
    """Fill addresses the user left unset with the injecting node's own.

    Scapy's defaults for ``Ether.src/dst``, ``IP.src`` and ``ARP.hwsrc/psrc``
    come from the *host's* routing and ARP tables (``conf.route``), which say
    nothing about a lab node, and an unresolved ``Ether.dst`` would make Scapy
    ARP from the root namespace.  So every such field is set here; a field the
    user wrote (present in ``layer.fields``) is left alone.  When ``l2`` and
    the expression starts above Ethernet (``IP(...)``), ``Ether()`` is
    prepended because AF_PACKET injection on an Ethernet device sends whole
    frames.  ``dst_mac=None`` means broadcast; ``src_ip=None`` leaves IP and
    ARP sources to Scapy.  The input is not modified.
    """
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Ether

    pkt = pkt.copy()
    if l2 and not isinstance(pkt, Ether):
        pkt = Ether() / pkt
    _set_unset(pkt.getlayer(Ether), src=src_mac, dst=dst_mac or BROADCAST_MAC)
    v6 = src_ip is not None and ":" in src_ip
    _set_unset(pkt.getlayer(ARP), hwsrc=src_mac, psrc=None if v6 else src_ip)
    _set_unset(pkt.getlayer(IPv6 if v6 else IP), src=src_ip)
    return pkt


def _set_unset(layer: Packet | None, **values: str | None) -> None:
    """Set each field the user did not write; skip values that are None."""
    if layer is None:
        return
    for name, value in values.items():
        if value is not None and layer.fields.get(name) is None:
            setattr(layer, name, value)
