"""Check steps beyond the packet senders of ``checks.py``: ``exec`` (run a program in a node), ``tcp``
(connect, transfer), and per-check interface ``features`` (ethtool -K, undone afterwards).

Kept apart from ``checks.py`` so that file stays the schema's index; like it, this knows no kernel.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from labctl.expect.values import check_address
from labctl.topology.model import Strict

ARGV_MAX = 256
"""Arguments in one argv (a bound: lab files are input, never trusted)."""

FEATURE_ALIASES = {
    "gro": "rx-gro",
    "tso": "tx-tcp-segmentation",
    "gso": "tx-generic-segmentation",
    "lro": "rx-lro",
}
"""ethtool's short names (``ethtool -K eth0 gro off``) -> the feature names the kernel reports."""

FEATURE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")


def _argv(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("argv is empty: name the program, e.g. [bridge, link, show]")
    if len(value) > ARGV_MAX:
        raise ValueError(f"argv has {len(value)} arguments (at most {ARGV_MAX})")
    for arg in value:
        if "\x00" in arg:
            raise ValueError("an argument contains a NUL byte")
    return value


def _regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    return value


class ExecOutcome(Strict):
    """What an exec step must end with; each key given is judged (a row), none given is not."""

    exit: Annotated[int, Field(ge=0, le=255)] | None = None
    stdout: str | None = None
    """Regular expression searched in the standard output (re.search, multiline)."""
    stderr: str | None = None

    _re = field_validator("stdout", "stderr")(_regex)


class Exec(Strict):
    """Run a program inside a node: argv only (no shell unless the argv is ``[sh, -c, ...]``)."""

    node: str
    cmd: list[str]
    timeout: Annotated[float, Field(gt=0, le=60)] = 5
    """Seconds; the program (its whole process group) is killed at it and the check is an ERROR."""
    exit: Annotated[int, Field(ge=0, le=255)] | None = None
    stdout: str | None = None
    stderr: str | None = None

    _cmd = field_validator("cmd")(_argv)
    _re = field_validator("stdout", "stderr")(_regex)

    def outcome(self) -> ExecOutcome | None:
        if self.exit is None and self.stdout is None and self.stderr is None:
            return None
        return ExecOutcome(exit=self.exit, stdout=self.stdout, stderr=self.stderr)


class SetupExec(Exec):
    """An exec step of ``setup``: it must end as said (``exit`` 0 unless given) or the check is an ERROR;
    ``undo`` (an argv) runs in the same node when the check is undone, in reverse order."""

    exit: Annotated[int, Field(ge=0, le=255)] | None = 0
    undo: list[str] | None = None

    _undo = field_validator("undo")(lambda v: None if v is None else _argv(v))


def split_endpoint(to: str) -> tuple[str, int]:
    """'10.0.0.2:80' or '[fd00::2]:80' -> (address, port), with the errors a lab file needs."""
    host, sep, port = to.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'to' must be ADDRESS:PORT with a port 1-65535, got {to!r}")
    check_address(host)
    return host.strip("[]"), int(port)


class SendTcp(Strict):
    """``count`` connections from the node's own stack to ``to``, each sending ``bytes`` bytes then closing."""

    node: str
    to: str
    bytes: Annotated[int, Field(ge=0, le=64 * 1024 * 1024)] = 0
    count: Annotated[int, Field(ge=1, le=1000)] = 1
    timeout: Annotated[float, Field(gt=0, le=30)] = 1.0
    """Seconds a connection may wait for the handshake (TCP_USER_TIMEOUT): then it is timed out."""
    cpu: Annotated[int, Field(ge=0)] | None = None
    """Connect from this CPU: every packet of the step then takes that CPU's backlog, in order (a client's
    last ACK is not overtaken by its next SYN, so what the first connection did to the listener is what the
    second meets)."""

    @model_validator(mode="after")
    def _to(self) -> SendTcp:
        split_endpoint(self.to)
        return self

    @property
    def host(self) -> str:
        """The destination address without brackets."""
        return split_endpoint(self.to)[0]

    @property
    def port(self) -> int:
        return split_endpoint(self.to)[1]


def feature_name(name: str) -> str:
    return FEATURE_ALIASES.get(name, name)


def check_features(value: dict[str, dict[str, bool]]) -> dict[str, dict[str, bool]]:
    """``{'node:iface': {feature: bool}}``: names as ethtool spells them (aliases resolved when applied)."""
    for ref, wanted in value.items():
        if not re.match(r"^[^:]+:[^:]+$", ref):
            raise ValueError(f"{ref!r}: features are keyed by 'node:iface'")
        if not wanted:
            raise ValueError(f"{ref}: no feature named")
        for name in wanted:
            if not FEATURE_RE.match(name):
                raise ValueError(f"{ref}: {name!r} is not an ethtool feature name (like rx-gro-list)")
    return value


def exec_label(index: int, phase: str = "traffic") -> str:
    """The ``exec`` expectation's key for exec step ``index``: 'traffic[2]', or 'setup.exec[0]'."""
    return f"traffic[{index}]" if phase == "traffic" else f"setup.exec[{index}]"


def exec_expectations(data: Any) -> Any:
    """Raw check data with each exec step's exit/stdout/stderr also under ``expect.exec``.

    The step is where a user states them; the ``exec`` kind of the registry is what judges them (a row
    each, on the recorded result), so a key that is parsed is judged by the one mechanism every
    expectation goes through.  A setup step states ``exit: 0`` unless it says otherwise.
    """
    if not isinstance(data, dict):
        return data
    derived: dict[str, dict[str, Any]] = {}
    setup = data.get("setup")
    for phase, steps in (("setup", setup.get("exec") if isinstance(setup, dict) else None),
                         ("traffic", data.get("traffic"))):
        for index, step in enumerate(steps if isinstance(steps, list) else []):
            run = (step.get("exec") if phase == "traffic" else step) if isinstance(step, dict) else None
            if not isinstance(run, dict):
                continue
            defaults = {"exit": 0} if phase == "setup" else {}
            stated = {k: run.get(k, defaults.get(k)) for k in ("exit", "stdout", "stderr")}
            stated = {k: v for k, v in stated.items() if v is not None}
            if stated:
                derived[exec_label(index, phase)] = stated
    if not derived:
        return data
    expect = data.get("expect")
    expect = dict(expect) if isinstance(expect, dict) else {}
    given = expect.get("exec")
    merged = dict(given) if isinstance(given, dict) else {}
    for label, stated in derived.items():
        if label in merged and merged[label] != stated:
            raise ValueError(f"expect.exec[{label}] disagrees with what the step states ({stated})")
        merged[label] = stated
    expect["exec"] = merged
    return {**data, "expect": expect}
