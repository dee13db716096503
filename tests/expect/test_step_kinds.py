"""The tcp, socket and exec judges on hand-made Evidence: every stated key gives a row, and what the
kernel did not show (no connection, no listener recorded, a program that did not run) is never a PASS."""

from __future__ import annotations

from typing import Any

from labctl.evidence.model import ConnectionEvidence, Evidence, ExecEvidence, SocketEvidence
from labctl.expect.base import JudgeContext, kinds
from labctl.topology.checks import Check

CTX = JudgeContext()


def _rows(expect: dict[str, Any], ev: Evidence) -> list[tuple[str, bool]]:
    check = Check.model_validate({"name": "c", "expect": expect})
    rows = []
    for key, kind in kinds().items():
        value = getattr(check.expect, key)
        if value is not None:
            rows += [(r.what, r.ok) for r in kind.judge(value, ev, CTX)]
    return rows


REFUSED = ConnectionEvidence("client", "10.0.0.2:81", "refused", "ECONNREFUSED")
CONNECTED = ConnectionEvidence("client", "10.0.0.2:80", "connected", None, 100, "ESTABLISHED")
TIMED_OUT = ConnectionEvidence("client", "10.0.0.2:80", "timed_out", "ETIMEDOUT")


def test_tcp_counts_errno_and_bytes() -> None:
    ev = Evidence(connections=(REFUSED, CONNECTED))
    rows = _rows({"tcp": {"connected": 1, "refused": 1, "timed_out": 0, "sent_bytes": 100}}, ev)
    assert all(ok for _, ok in rows) and len(rows) == 4
    assert _rows({"tcp": {"errno": "ECONNREFUSED"}}, ev) == [("tcp connect errno", False)]  # one connected
    assert _rows({"tcp": {"errno": "ECONNREFUSED"}}, Evidence(connections=(REFUSED,))) == [("tcp connect errno", True)]
    assert _rows({"tcp": {"errno": "none"}}, Evidence(connections=(CONNECTED,)))[0][1]
    assert not _rows({"tcp": {"errno": "ETIMEDOUT"}}, Evidence(connections=(REFUSED, TIMED_OUT)))[0][1]


def test_tcp_without_any_connection_is_not_a_pass() -> None:
    for expect in ({"connected": 0}, {"refused": 0}, {"errno": "none"}, {"sent_bytes": 0}):
        assert not any(ok for _, ok in _rows({"tcp": expect}, Evidence())), expect


LISTENER = SocketEvidence("server", 80, 2, 200, 0, 1, (), "tcp", "LISTEN", 0)
UDP = SocketEvidence("server", 53, 3, 30, 768, 0, ("10.0.0.1",) * 3)


def test_socket_is_judged_per_listener() -> None:
    ev = Evidence(sockets=(LISTENER, UDP))
    expect = {
        "socket": {
            "server:80": {"received": 2, "bytes": 200, "drops": 1, "state": "LISTEN", "accept_queue": 0},
            "server:53": {"received": 3, "queued_bytes": ">=1", "drops": 0},
        }
    }
    rows = _rows(expect, ev)
    assert len(rows) == 8 and all(ok for _, ok in rows), rows
    wrong = _rows({"socket": {"server:53": {"received": 5}, "server:80": {"state": "ESTABLISHED"}}}, ev)
    assert [ok for _, ok in wrong] == [False, False]
    assert _rows({"socket": {"server:80": {"received": 0}}}, Evidence()) == [
        ("socket server:80 read (udp: datagrams, tcp: connections accepted)", False)
    ]


def _run(exit: int | None, out: str = "", error: str | None = None) -> ExecEvidence:
    return ExecEvidence("traffic[0]", "host", ("bridge", "link"), exit, out, "", 0.01, error)


def test_exec_exit_and_output_rows() -> None:
    expect = {"exec": {"traffic[0]": {"exit": 0, "stdout": "isolated on"}}}
    assert all(ok for _, ok in _rows(expect, Evidence(execs=(_run(0, "x isolated on y"),))))
    assert [ok for _, ok in _rows(expect, Evidence(execs=(_run(1, "isolated off"),)))] == [False, False]


def test_exec_that_did_not_run_fails_every_way() -> None:
    expect = {"exec": {"traffic[0]": {"exit": 0}}}
    assert _rows(expect, Evidence()) == [("traffic[0] ran", False)]
    assert _rows(expect, Evidence(execs=(_run(None, error="timed out after 1 s (killed)"),))) == [
        ("traffic[0] ran", False)
    ]


def test_evidence_round_trips_the_new_fields() -> None:
    ev = Evidence(connections=(REFUSED, CONNECTED), sockets=(LISTENER, UDP), execs=(_run(0, "out"),))
    again = Evidence.from_dict(ev.as_dict())
    assert again.connections == ev.connections and again.sockets == ev.sockets and again.execs == ev.execs
    old = Evidence.from_dict({"sockets": [{k: v for k, v in UDP.as_dict().items() if k not in ("proto", "state")}]})
    assert old.sockets[0].proto == "udp"  # golden files recorded before tcp listeners still load


def test_tcp_states_count_connections_per_state() -> None:
    ev = Evidence(connections=(REFUSED, CONNECTED))
    refused_closed = ConnectionEvidence("client", "10.0.0.2:81", "refused", "ECONNREFUSED", 0, "CLOSE")
    assert _rows({"tcp": {"states": {"ESTABLISHED": 1}}}, ev) == [("tcp connections in state ESTABLISHED", True)]
    ev2 = Evidence(connections=(refused_closed,))
    assert _rows({"tcp": {"states": {"CLOSE": 1, "ESTABLISHED": 0}}}, ev2) == [
        ("tcp connections in state CLOSE", True),
        ("tcp connections in state ESTABLISHED", True),
    ]
    assert not _rows({"tcp": {"states": {"ESTABLISHED": 1}}}, ev2)[0][1]
