"""An interface's traffic control, as ``tc`` writes it: a root qdisc (with htb classes), ingress/clsact, filters.

Values are in tc's own units (``1mbit``, ``32kb``, ``10ms``, ``1%``) and are
parsed here into numbers (bytes/s, bytes, microseconds), so a unit that does
not parse is a validation error at its line.  The model knows no kernel: which
qdiscs, classifiers and actions this kernel has is checked from its options
(:func:`requirements`) before anything is built.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

_RATE_UNITS = {
    "bit": 1, "kbit": 1000, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 1024, "mibit": 1024**2, "gibit": 1024**3,
    "bps": 8, "kbps": 8000, "mbps": 8 * 10**6, "gbps": 8 * 10**9,
    "kibps": 8 * 1024, "mibps": 8 * 1024**2, "gibps": 8 * 1024**3,
}  # fmt: skip
"""bits per second per unit, as iproute2's get_rate (``kbit`` is 1000 bits, ``bps`` a byte per second)."""
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
    "kbit": 128, "mbit": 1024**2 // 8, "gbit": 1024**3 // 8,
}  # fmt: skip
"""bytes per unit, as iproute2's get_size (``kb`` is 1024 bytes)."""
_TIME_UNITS = {
    "": 1, "us": 1, "usec": 1, "usecs": 1, "ms": 1000, "msec": 1000, "msecs": 1000,
    "s": 10**6, "sec": 10**6, "secs": 10**6,
}  # fmt: skip
"""microseconds per unit, as iproute2's get_time (no unit: microseconds)."""
_NUMBER = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)$")


def _parse(value: Any, units: dict[str, int], what: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a {what} such as {example}")
    match = _NUMBER.match(str(value).strip().lower())
    if match is None or match["unit"] not in units:
        known = ", ".join(u for u in units if u)
        raise ValueError(f"{value!r} is not a {what} in tc's units, such as {example} ({known})")
    number = float(match["n"]) * units[match["unit"]]
    if number <= 0:
        raise ValueError(f"a {what} must be above zero, not {value!r}")
    return int(number)


def parse_rate(value: Any) -> int:
    """tc rate -> bytes per second (what the kernel's tc_ratespec holds)."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{value!r} has no unit: write a rate as tc does, such as 1mbit or 500kbit")
    return max(1, _parse(value, _RATE_UNITS, "rate", "1mbit") // 8)


def parse_size(value: Any) -> int:
    return _parse(value, _SIZE_UNITS, "size", "32kb or 1600b")


def parse_time(value: Any) -> int:
    return _parse(value, _TIME_UNITS, "time", "10ms")


def _percent(value: Any) -> float:
    text = str(value).strip()
    match = re.match(r"^(\d+(?:\.\d+)?)%$", text)
    if match is None or not 0 <= float(match[1]) <= 100:
        raise ValueError(f"{value!r} is not a percentage such as 1% or 0.5%")
    return float(match[1])


def _keep(check: Any) -> Any:
    def validate(value: Any) -> str:
        check(value)
        return str(value)

    return PlainValidator(validate)


Rate = Annotated[str, _keep(parse_rate)]
Size = Annotated[str, _keep(parse_size)]
Time = Annotated[str, _keep(parse_time)]
Percent = Annotated[str, _keep(_percent)]
_CLASSID = re.compile(r"^(?P<major>[0-9a-f]{1,4}):(?P<minor>[0-9a-f]{1,4})$")


def parse_classid(text: str) -> int:
    """``1:10`` (hex, as tc) -> the 32-bit handle."""
    match = _CLASSID.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a class id such as 1:10 (hex major:minor)")
    return (int(match["major"], 16) << 16) | int(match["minor"], 16)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class HtbClass(_Strict):
    """``tc class add dev D parent 1: classid 1:10 htb rate 1mbit ceil 2mbit``."""

    rate: Rate
    ceil: Rate | None = None
    burst: Size | None = None
    prio: Annotated[int, Field(ge=0, le=7)] | None = None


class Qdisc(_Strict):
    """The interface's root qdisc (handle 1:); which keys apply depends on ``kind``."""

    kind: Literal["tbf", "pfifo", "htb", "fq_codel", "netem"]
    limit: Annotated[int, Field(ge=1)] | Size | None = None
    """pfifo/netem/fq_codel: packets; tbf: bytes (a size, e.g. 32kb) unless ``latency`` is given."""
    rate: Rate | None = None
    """tbf (required) and netem: e.g. 1mbit."""
    burst: Size | None = None
    """tbf: the bucket, e.g. 32kb (default 1600b)."""
    latency: Time | None = None
    """tbf: instead of limit, the longest a packet may wait."""
    default: str | None = None
    """htb: the class (minor, hex, as tc: "20" for 1:20) unclassified traffic goes to."""
    classes: dict[str, HtbClass] = {}
    """htb: classid ("1:10") -> class."""
    delay: Time | None = None
    jitter: Time | None = None
    loss: Percent | None = None
    """netem: delay 10ms, jitter 1ms, loss 1%."""
    target: Time | None = None
    interval: Time | None = None
    """fq_codel: target 5ms, interval 100ms."""

    @field_validator("classes")
    @classmethod
    def _classids(cls, classes: dict[str, HtbClass]) -> dict[str, HtbClass]:
        for classid in classes:
            handle = parse_classid(classid)
            if handle >> 16 != 1 or handle & 0xFFFF == 0:
                raise ValueError(f"class {classid}: classes of the root qdisc are 1:N with N above 0")
        return classes

    @model_validator(mode="after")
    def _fits_kind(self) -> Qdisc:
        allowed = {
            "tbf": {"rate", "burst", "limit", "latency"},
            "pfifo": {"limit"},
            "htb": {"default", "classes"},
            "fq_codel": {"limit", "target", "interval"},
            "netem": {"delay", "jitter", "loss", "rate", "limit"},
        }[self.kind]
        given = {k for k in self.model_fields_set if k != "kind"}
        extra = sorted(given - allowed)
        if extra:
            raise ValueError(f"{', '.join(extra)} do not apply to {self.kind} (it takes {', '.join(sorted(allowed))})")
        if self.kind == "tbf":
            if self.rate is None:
                raise ValueError("tbf needs a rate (e.g. rate: 1mbit)")
            if (self.limit is None) == (self.latency is None):
                raise ValueError("tbf needs exactly one of limit (bytes) or latency (time)")
        if self.kind == "pfifo" and isinstance(self.limit, str) and not self.limit.isdigit():
            raise ValueError("a pfifo limit is a number of packets")
        if self.kind == "htb" and self.default is not None:
            if not re.match(r"^[0-9a-f]{1,4}$", self.default):
                raise ValueError(f"default {self.default!r} is a class minor in hex, e.g. '20' for 1:20")
            if f"1:{self.default}" not in self.classes:
                raise ValueError(f"default class 1:{self.default} is not among the classes")
        if self.jitter is not None and self.delay is None:
            raise ValueError("netem jitter needs a delay")
        return self


class Mirred(_Strict):
    """``action mirred egress redirect dev IFACE`` (or mirror)."""

    to: str
    mode: Literal["redirect", "mirror"] = "redirect"


class MirredAction(_Strict):
    mirred: Mirred


class U32Match(_Strict):
    """What a u32 filter matches in the IPv4 header (all given must hold)."""

    protocol: Literal["udp", "tcp", "icmp"] | None = None
    src: str | None = None
    dst: str | None = None
    sport: Annotated[int, Field(ge=0, le=65535)] | None = None
    dport: Annotated[int, Field(ge=0, le=65535)] | None = None

    @field_validator("src", "dst")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        import ipaddress

        if value is not None:
            try:
                net = ipaddress.ip_network(value if "/" in value else f"{value}/32", strict=True)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not an IPv4 address or network: {exc}") from None
            if net.version != 4:
                raise ValueError("u32 matches here are IPv4")
        return value

    @model_validator(mode="after")
    def _ports(self) -> U32Match:
        if (self.sport is not None or self.dport is not None) and self.protocol not in ("udp", "tcp"):
            raise ValueError("ports need protocol udp or tcp")
        return self


class Filter(_Strict):
    """A classifier on the interface, with what happens to what it matches.

    ``attach``: ``egress``/``ingress`` (the clsact or ingress qdisc) or ``root``
    (the root qdisc, classful: htb).  ``bpf`` takes a tcpdump expression,
    compiled by libpcap to classic BPF and run in direct-action mode: its
    ``drop``/``pass`` needs no action module.  ``u32`` and ``flower`` match
    ``{protocol, src, dst, sport, dport}``; ``u32``/``flower``/``matchall`` act
    through actions: ``drop``/``pass`` are gact's, ``{mirred: {to, mode}}``.
    ``classid`` puts what matches into an htb class instead.
    """

    kind: Literal["u32", "bpf", "matchall", "flower"]
    attach: Literal["egress", "ingress", "root"]
    match: U32Match | str | None = None
    action: Literal["drop", "pass"] | MirredAction | None = None
    classid: str | None = None
    prio: Annotated[int, Field(ge=1, le=0xFFFF)] | None = None

    @field_validator("classid")
    @classmethod
    def _classid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_classid(value)
        return value

    @model_validator(mode="after")
    def _shape(self) -> Filter:
        if self.kind == "bpf" and not isinstance(self.match, str):
            raise ValueError("a bpf filter's match is a tcpdump expression, e.g. 'udp dst port 5999'")
        if self.kind in ("u32", "flower") and not isinstance(self.match, U32Match):
            raise ValueError(f"a {self.kind} filter's match is {{protocol, src, dst, sport, dport}}")
        if self.kind == "matchall" and self.classid is not None:
            raise ValueError("matchall here takes an action, not a classid")
        if self.kind == "matchall" and self.match is not None:
            raise ValueError("matchall matches everything: it takes no match")
        if (self.action is None) == (self.classid is None):
            raise ValueError("a filter needs exactly one of action (drop, pass, {mirred: ...}) or classid")
        if self.kind == "bpf" and isinstance(self.action, MirredAction):
            raise ValueError("a bpf filter here runs in direct-action mode: drop or pass (mirred: use u32)")
        if self.classid is not None and self.attach != "root":
            raise ValueError("classid classifies into a class of the root qdisc: attach: root")
        return self


class TcConfig(_Strict):
    """``tc:`` of an interface."""

    qdisc: Qdisc | None = None
    ingress: bool = False
    clsact: bool = False
    filters: list[Filter] = []

    @model_validator(mode="after")
    def _attachments(self) -> TcConfig:
        if self.ingress and self.clsact:
            raise ValueError("ingress and clsact both take the ingress hook: use clsact (it has ingress and egress)")
        for index, flt in enumerate(self.filters):
            where = f"filters[{index}]"
            if flt.attach == "egress" and not self.clsact:
                raise ValueError(f"{where}: attach: egress needs clsact: true")
            if flt.attach == "ingress" and not (self.clsact or self.ingress):
                raise ValueError(f"{where}: attach: ingress needs clsact: true or ingress: true")
            if flt.attach == "root" and (self.qdisc is None or self.qdisc.kind != "htb"):
                raise ValueError(f"{where}: attach: root needs a classful root qdisc (kind: htb)")
            if flt.classid is not None and self.qdisc is not None and flt.classid not in self.qdisc.classes:
                raise ValueError(f"{where}: class {flt.classid} is not among the root qdisc's classes")
        return self


QDISC_OPTIONS = {
    "tbf": "CONFIG_NET_SCH_TBF",
    "pfifo": "CONFIG_NET_SCH_FIFO",
    "htb": "CONFIG_NET_SCH_HTB",
    "fq_codel": "CONFIG_NET_SCH_FQ_CODEL",
    "netem": "CONFIG_NET_SCH_NETEM",
    "ingress": "CONFIG_NET_SCH_INGRESS",
    "clsact": "CONFIG_NET_SCH_INGRESS",
}
FILTER_OPTIONS = {
    "u32": "CONFIG_NET_CLS_U32",
    "bpf": "CONFIG_NET_CLS_BPF",
    "matchall": "CONFIG_NET_CLS_MATCHALL",
    "flower": "CONFIG_NET_CLS_FLOWER",
}
ACTION_OPTIONS = {"gact": "CONFIG_NET_ACT_GACT", "mirred": "CONFIG_NET_ACT_MIRRED"}


def requirements(tc: TcConfig) -> list[tuple[tuple[str | int, ...], str, str]]:
    """(key path under ``tc``, what, kernel option) for every qdisc, classifier and action ``tc`` uses."""
    needed: list[tuple[tuple[str | int, ...], str, str]] = []
    if tc.qdisc is not None:
        needed.append((("qdisc", "kind"), tc.qdisc.kind, QDISC_OPTIONS[tc.qdisc.kind]))
    for hook in ("ingress", "clsact"):
        if getattr(tc, hook):
            needed.append(((hook,), hook, QDISC_OPTIONS[hook]))
    for index, flt in enumerate(tc.filters):
        needed.append((("filters", index, "kind"), flt.kind, FILTER_OPTIONS[flt.kind]))
        if flt.action is not None and flt.kind != "bpf":
            action = "mirred" if isinstance(flt.action, MirredAction) else "gact"
            what = f"action {flt.action if isinstance(flt.action, str) else 'mirred'} ({action})"
            needed.append((("filters", index, "action"), what, ACTION_OPTIONS[action]))
    return needed


def from_legacy(kind: str, limit: int, rate: str, burst: int) -> TcConfig:
    """The older ``qdisc: {kind: tbf|pfifo, limit, rate, burst}`` key, as a ``tc:`` root qdisc."""
    if kind == "tbf":
        return TcConfig(qdisc=Qdisc(kind="tbf", limit=limit, rate=rate, burst=f"{burst}b"))
    return TcConfig(qdisc=Qdisc(kind="pfifo", limit=limit))
