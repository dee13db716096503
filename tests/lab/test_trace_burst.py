"""``labctl trace -n N``: a burst explained once per distinct path, and still exact.

The golden tests read a recorded window (``golden/trace-burst``: 2000 frames
from one lab while a second lab with the same names injected the same frame
from another process) and check that folding identical skbs changes nothing
but the cost: attribution keeps exactly the skbs it keeps unfolded, every
injected skb gets its own path, the groups and counts are those expected.
The real-kernel tests trace a burst and check that the counts add up.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from labctl.evidence.attribution import Scope, attribute
from labctl.kernel import netns, tracefs
from labctl.kernel.tracefs import TraceEvent
from labctl.lab.trace import Knowledge, PacketPath, TraceResult, explain, trace_packet
from labctl.lab.trace.burst import Folding
from labctl.lab.trace.explain import is_injection
from labctl.lab.trace.frame import FrameInfo
from labctl.lab.traffic import PreparedFrame
from labctl.topology.model import Topology
from tests.conftest import LabFactory
from tests.lab.test_trace import CLOSED, ROOT, _app, pair

GOLDEN = Path(__file__).parent / "golden"
RECORDINGS = ("trace-burst", "trace-burst-rich")
"""2000 frames with the lean events beside a flood of look-alikes; 300 with the rich ones (fib lookups)."""
TOPOLOGY = """\
name: burst-gold
topology:
  nodes:
    client:
      interfaces:
        eth0: {addresses: [10.97.0.1/24]}
    server:
      interfaces:
        eth0: {addresses: [10.97.0.2/24]}
  links:
    - endpoints: ["client:eth0", "server:eth0"]
"""


def _recorded(name: str) -> tuple[list[TraceEvent], dict[str, Any]]:
    formats: dict[str, list[tracefs.EventFormat]] = {}
    for file in sorted((GOLDEN / name / "formats").glob("*.format")):
        fmt = tracefs.parse_format(file.read_text(), system=file.name.split(".")[0])
        formats.setdefault(fmt.name, []).append(fmt)
    cache: tracefs.LineCache = {}
    text = gzip.decompress((GOLDEN / name / "trace.txt.gz").read_bytes()).decode()
    events = [e for line in text.split("\n") if (e := tracefs.parse_line(line, formats, cache, share=True))]
    return events, json.loads((GOLDEN / name / "meta.json").read_text())


@pytest.fixture(scope="module", params=RECORDINGS)
def recorded(request: pytest.FixtureRequest) -> tuple[list[TraceEvent], dict[str, Any]]:
    return _recorded(request.param)


def _scope(meta: dict[str, Any]) -> Scope:
    return Scope(devices={"eth0"}, tasks={meta["tid"]}, since=meta["since"], until=meta["until"] + 0.5)


def _folding(meta: dict[str, Any]) -> Folding:
    return Folding(meta["tid"], meta["ifname"], len(bytes.fromhex(meta["frame"])))


def test_folding_keeps_attribution_exact(recorded: tuple[list[TraceEvent], dict[str, Any]]) -> None:
    events, meta = recorded
    plain, _ = attribute(events, _scope(meta))
    folding = _folding(meta)
    reduced = folding.fold(events, _scope(meta))
    folded, _ = attribute(reduced, _scope(meta))
    assert folding.folded_events > 3 * meta["sent"] and len(reduced) <= len(events) - folding.folded_events
    expanded = []
    for packet in folded:
        group = folding.groups.get(id(packet.events[0]))
        if group is None:
            expanded.append(tuple(map(id, packet.events)))
            continue
        assert list(packet.events) == group.representative.events  # attribution kept it whole
        expanded += [tuple(map(id, member.events)) for member in group.members]
    assert sorted(expanded) == sorted(tuple(map(id, p.events)) for p in plain)
    # the look-alike lab's skbs (same device name, frame and length, another process) are never the lab's
    assert {p.events[0].pid for p in plain} == {meta["tid"]}
    length = len(bytes.fromhex(meta["frame"]))
    assert sum(1 for p in plain if is_injection(p.events[0], meta["tid"], meta["ifname"], length)) == meta["sent"]


def _explained(events: list[TraceEvent], meta: dict[str, Any], fold: bool) -> list[PacketPath]:
    topo = Topology.model_validate(yaml.safe_load(TOPOLOGY))
    frame = bytes.fromhex(meta["frame"])
    prepared = PreparedFrame(netns.namespace_name(topo.name, "client"), meta["ifname"], frame, "UDP")
    folding = _folding(meta) if fold else None
    scope = _scope(meta)
    attributed = attribute(folding.fold(events, scope) if folding else events, scope)[1]
    knowledge = Knowledge(topo)
    knowledge.set_fib(attributed)
    paths, _ = explain(
        attributed, knowledge, prepared, FrameInfo.parse(frame), meta["tid"], meta["since"], meta["sent"], folding
    )
    return paths


LEAN_PATH = (
    "dev_queue_xmit → netif_rx → backlog → netif_receive_skb → ip_rcv → PREROUTING → routing → LOCAL_IN → UDP"
    " ✗ NO_SOCKET"
)


RICH_PATH = (
    "dev_queue_xmit → driver xmit → tx done → netif_rx → backlog → netif_receive_skb → ip_rcv → PREROUTING"
    " → routing → LOCAL_IN → UDP ✗ NO_SOCKET"
)


def _names(path: PacketPath) -> str:
    return " → ".join(s.name for s in path.stages) + f" ✗ {path.ending.reason}"


def test_a_burst_is_explained_once_per_path(recorded: tuple[list[TraceEvent], dict[str, Any]]) -> None:
    events, meta = recorded
    folded = _explained(events, meta, fold=True)
    plain = _explained(events, meta, fold=False)
    assert len(folded) == len(plain) == meta["sent"]
    for one, other in zip(folded, plain, strict=True):  # every skb: its own index, address and events
        assert (one.index, one.skb, one.signature()) == (other.index, other.skb, other.signature())
        assert [id(e) for e in one.events] == [id(e) for e in other.events]
    assert len({id(p.segments) for p in folded}) < 50  # explained once per group, not once per skb
    result = TraceResult("burst-gold", "client", "eth0", CLOSED, "UDP", 42, meta["sent"], sent=meta["sent"])
    result.packets = folded
    groups = [(_names(g[0]), len(g)) for g in result.groups()]
    assert groups == GROUPS[meta["sent"]]
    routing = [s for s in result.groups()[0][0].stages if s.name == "routing"]
    assert routing[0].evidence == ("traced" if knowledge_has_fib(events) else "inferred")
    assert result.fates == {"dropped:NO_SOCKET": meta["sent"]}
    data = result.as_dict()
    assert [(p["count"], len(p["skbs"])) for p in data["packets"]] == [(n, n) for _, n in GROUPS[meta["sent"]]]
    assert sorted(row[0] for p in data["packets"] for row in p["skbs"]) == list(range(meta["sent"]))


GROUPS = {2000: [(LEAN_PATH, 2000)], 300: [(RICH_PATH, 300)]}
"""Per recording (by its frame count): the distinct paths and how many took each (the look-alike lab's
frames are never among them)."""


def knowledge_has_fib(events: list[TraceEvent]) -> bool:
    return any(e.key == "fib:fib_table_lookup" for e in events)


# ---------------------------------------------------------------- the real kernel


@ROOT
def test_a_burst_of_2000_adds_up(make_lab: LabFactory) -> None:
    topo = make_lab(pair())
    result = trace_packet(topo, "client", CLOSED, count=2000)
    assert result.sent == 2000 and result.lost_events == 0
    assert len(result.packets) == 2000 and [p.index for p in result.packets] == list(range(2000))
    assert len({p.skb for p in result.packets}) < 2000  # addresses are recycled: folding is what groups them
    assert len({id(p.segments) for p in result.packets}) < 100
    assert sum(len(g) for g in result.groups()) == 2000
    assert result.fates == {"dropped:NO_SOCKET": 2000}
    assert all(p.nodes == ["client", "server"] for p in result.packets)
    assert result.counters["server"]["Udp.NoPorts"] == 2000  # the kernel's own count agrees


@ROOT
def test_cli_groups_a_burst(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(pair())
    text = CliRunner().invoke(_app(), ["trace", lab_name, "client", CLOSED, "-n", "500"])
    assert text.exit_code == 0, text.output
    counts = [int(n) for n in re.findall(r"^packet \d+ ×(\d+) identical", text.stdout, re.M)]
    singles = len(re.findall(r"^packet \d+ skb", text.stdout, re.M))
    assert sum(counts) + singles == 500 and counts, text.stdout
    result = CliRunner().invoke(_app(), ["trace", lab_name, "client", CLOSED, "-n", "500", "--json"])
    data = json.loads(result.stdout)
    assert sum(p["count"] for p in data["packets"]) == 500 == data["fates"]["dropped:NO_SOCKET"]
    assert Counter(len(p["skbs"]) == p["count"] for p in data["packets"]) == {True: len(data["packets"])}


def test_a_member_whose_fib_lookup_is_missing_gets_its_own_path() -> None:
    """A frame whose fib lookup the trace lacks (lost, say) reads differently: never hidden in a group."""
    events, meta = _recorded("trace-burst-rich")
    tenth = _explained(events, meta, fold=False)[10]
    received = next(e for e in tenth.events if e.key == "net:netif_receive_skb")
    gone = {
        id(e)
        for e in events
        if e.key == "fib:fib_table_lookup"
        and e.cpu == received.cpu
        and received.timestamp <= e.timestamp <= tenth.events[-1].timestamp
    }
    assert gone
    fewer = [e for e in events if id(e) not in gone]
    folded, plain = _explained(fewer, meta, fold=True), _explained(fewer, meta, fold=False)
    assert [(p.index, p.skb, p.signature()) for p in folded] == [(p.index, p.skb, p.signature()) for p in plain]
    result = TraceResult("burst-gold", "client", "eth0", CLOSED, "UDP", 42, meta["sent"], sent=meta["sent"])
    result.packets = folded
    assert sorted(len(g) for g in result.groups()) == [1, meta["sent"] - 1]
    alone = next(g[0] for g in result.groups() if len(g) == 1)
    assert alone.index == 10 and next(s for s in alone.stages if s.name == "routing").evidence != "traced"


def test_a_burst_that_lost_events_stays_exact(recorded: tuple[list[TraceEvent], dict[str, Any]]) -> None:
    """The ring lost a stretch of the burst: the skbs cut by the gap are explained one by one, never grouped
    with whole ones, and the loss is counted where the kernel said it (the LOST line)."""
    events, meta = recorded
    times = sorted(e.timestamp for e in events)
    gap = (times[len(times) * 45 // 100], times[len(times) * 55 // 100])
    damaged = [e for e in events if not gap[0] <= e.timestamp <= gap[1]]
    folded, plain = _explained(damaged, meta, fold=True), _explained(damaged, meta, fold=False)
    assert 0 < len(plain) < meta["sent"]
    assert [(p.index, p.skb, p.signature(), [id(e) for e in p.events]) for p in folded] == [
        (p.index, p.skb, p.signature(), [id(e) for e in p.events]) for p in plain
    ]
    session = tracefs.TraceSession(["skb:kfree_skb"])  # never started: only its parser is used
    text = gzip.decompress((GOLDEN / "trace-burst" / "trace.txt.gz").read_bytes())
    lines = text.split(b"\n")
    with_loss = b"\n".join([*lines[:100], b"CPU:1 [LOST 4321 EVENTS]", *lines[100:]])
    session._read_available = lambda: with_loss  # type: ignore[method-assign]
    parsed = session._drain()
    assert session.lost_events() == 4321
    assert len(parsed) == len(lines) - 1  # every line but the trailing empty one, the LOST line aside
