"""Lines of trace_pipe → events: recorded real lines, and the cached fast path against the regex.

``parse_lines`` finds a line seen before by its text around the timestamp column; these tests hold it to
what ``parse_line`` (the header regex, then the event's format) says for every line of the recorded
bursts in ``tests/lab/golden``, and to hand-checked events for a few real lines.  No root needed.
"""

from __future__ import annotations

import copy
import gzip
import pickle
from pathlib import Path

import pytest

from labctl.kernel import tracefs
from labctl.kernel.tracefs import TraceEvent, parse_line, parse_lines, same_but_time

GOLDEN = Path(__file__).parents[1] / "lab" / "golden"


def _formats(name: str) -> dict[str, list[tracefs.EventFormat]]:
    formats: dict[str, list[tracefs.EventFormat]] = {}
    for file in sorted((GOLDEN / name / "formats").glob("*.format")):
        fmt = tracefs.parse_format(file.read_text(), system=file.name.split(".")[0])
        formats.setdefault(fmt.name, []).append(fmt)
    return formats


def _lines(name: str) -> list[str]:
    return gzip.decompress((GOLDEN / name / "trace.txt.gz").read_bytes()).decode().split("\n")


def _everything(event: TraceEvent) -> tuple[object, ...]:
    """Every slot, those worked out from the columns included (compare=False in the dataclass)."""
    return tuple(getattr(event, slot) for slot in TraceEvent.__slots__)


@pytest.mark.parametrize("name", ["trace-burst", "trace-burst-rich"])
def test_parse_lines_says_what_the_regex_says_for_every_recorded_line(name: str) -> None:
    formats, lines = _formats(name), _lines(name)
    cache: tracefs.LineCache = {}
    fast, lost = parse_lines(lines, formats, cache)
    slow = [e for line in lines if (e := parse_line(line, formats)) is not None]
    assert lost == 0 and len(fast) == len(slow) > 1000
    for one, other in zip(fast, slow, strict=True):
        assert _everything(one) == _everything(other)
    assert not any("raw" in e.fields for e in fast)  # every body followed its format
    # a burst repeats few distinct lines: each found by its text around the timestamp after its first time
    found_by_text = {key: tail for key, tail in cache.items() if isinstance(key, str)}
    assert len(found_by_text) < len(fast) / 5
    by_line: dict[str, int] = {}
    for event, line in zip(fast, (line for line in lines if parse_line(line, formats)), strict=True):
        around = line[: tracefs.lines.TS_COLUMN] + line[line.index(": ", tracefs.lines.TS_COLUMN) :]
        assert by_line.setdefault(around, same_but_time(event)) == same_but_time(event)  # one fields dict per line


QUEUE = "          python-28572   [001] b.... 21923.787551: net_dev_queue: dev=eth0 skbaddr=ffff8881c9cb9100 len=42"
DROP = (
    "          python-28572   [001] ..s1. 21923.787604: kfree_skb: skbaddr=ffff8881c9cb9100 rx_sk=0000000000000000"
    " protocol=2048 location=__udp4_lib_rcv+0x4bc/0xd00 reason: NO_SOCKET"
)
LEARNT = (
    "          python-27580   [001] ..s2. 21923.812959: br_fdb_update: br_dev br0 source veth1"
    " addr 02:00:00:00:08:01 vid 0 flags 0x0"
)
DEQUEUE = (
    "    kworker/u8:2-14792   [001] ..s2. 21923.916164: qdisc_dequeue: dequeue ifindex=0 qdisc handle=0x0"
    " parent=0x0 txq_state=0x0 packets=0 skbaddr=0000000000000000"
)
SKB = 0xFFFF8881C9CB9100


def test_recorded_lines_become_these_events() -> None:
    events, lost = parse_lines([QUEUE, DROP, LEARNT, DEQUEUE, ""], _formats("trace-burst-rich"), {})
    assert lost == 0
    queue, drop, learnt, dequeue = events
    assert queue == TraceEvent(21923.787551, 1, 28572, "python", "net", "net_dev_queue",
                               {"name": "eth0", "skbaddr": SKB, "len": 42}, "b....")  # fmt: skip
    assert (queue.key, queue.devices, queue.device, queue.skbaddr, queue.in_interrupt) == (
        "net:net_dev_queue", ("eth0",), "eth0", SKB, False
    )
    assert drop.fields == {
        "skbaddr": SKB,
        "rx_sk": 0,
        "protocol": 2048,
        "location": "__udp4_lib_rcv+0x4bc/0xd00",
        "reason": "NO_SOCKET",
    }
    assert (drop.key, drop.devices, drop.device, drop.in_interrupt) == ("skb:kfree_skb", (), None, True)
    assert (drop.function, drop.reason, drop.protocol) == ("__udp4_lib_rcv", "NO_SOCKET", 2048)
    assert learnt.fields == {"br_dev": "br0", "dev": "veth1", "addr": "02:00:00:00:08:01", "vid": 0, "flags": 0}
    assert (learnt.devices, learnt.device, learnt.skbaddr) == (("veth1", "br0"), "veth1", None)
    assert (dequeue.comm, dequeue.pid, dequeue.key) == ("kworker/u8:2", 14792, "qdisc:qdisc_dequeue")
    assert dequeue.skbaddr is None  # a null skbaddr is no skb


FORMAT = (
    "name: net_dev_queue\nID: 1\nformat:\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\n"
    'print fmt: "skbaddr=%p", REC->skbaddr\n'
)


def test_a_line_seen_before_is_found_by_its_text_and_only_its_time_differs() -> None:
    formats = {"net_dev_queue": [tracefs.parse_format(FORMAT, "net")]}
    short = "          python-703     [000] b....  6936.635830: net_dev_queue: skbaddr=ffff888108767f00"
    later = "          python-703     [000] b.... 16936.635877: net_dev_queue: skbaddr=ffff888108767f00"
    cache: tracefs.LineCache = {}
    (first, second), _ = parse_lines([short, later], formats, cache)
    assert (first.timestamp, second.timestamp) == (6936.635830, 16936.635877)
    assert same_but_time(first) == same_but_time(second) and first.fields is second.fields
    assert sum(isinstance(key, str) for key in cache) == 1  # the padded timestamp is the kernel's layout


def test_lines_of_another_layout_take_the_regex_and_say_the_same() -> None:
    """A recorded tgid column (``trace_options record-tgid``) moves the timestamp: never looked up by text.
    A CPU number of four digits moves it by one: the header before the column then ends in a space, and the
    line is looked up by its text (whose timestamp the regex found right after that space)."""
    formats = {"net_dev_queue": [tracefs.parse_format(FORMAT, "net")]}
    tgid = "          python-703     (    700) [000] b.... 6936.635830: net_dev_queue: skbaddr=ffff888108767f00"
    wide = "          python-703     [1000] b.... 6936.635831: net_dev_queue: skbaddr=ffff888108767f00"
    lost = "CPU:1 [LOST 7 EVENTS]"
    cache: tracefs.LineCache = {}
    events, gaps = parse_lines([tgid, wide, lost, tgid], formats, cache)
    assert gaps == 7
    expected = [(703, 0, 6936.635830), (703, 1000, 6936.635831), (703, 0, 6936.635830)]
    assert [(e.pid, e.cpu, e.timestamp) for e in events] == expected
    for event, line in zip(events, [tgid, wide, tgid], strict=True):
        assert _everything(event) == _everything(parse_line(line, formats))  # type: ignore[arg-type]
    column = tracefs.lines.TS_COLUMN
    assert [key for key in cache if isinstance(key, str)] == [wide[:column] + wide[wide.index(": ", column) :]]


def test_an_event_made_by_hand_works_out_the_same_and_travels_by_pickle() -> None:
    event = TraceEvent(1.5, 0, 7, "t", "bridge", "br_fdb_update", {"br_dev": "br0", "dev": "veth1", "skbaddr": 5})
    assert (event.key, event.devices, event.device, event.skbaddr, event.in_interrupt) == (
        "bridge:br_fdb_update", ("veth1", "br0"), "veth1", 5, False
    )
    assert event.names() == ("bridge:br_fdb_update", "bridge:br_fdb_update@veth1", "bridge:br_fdb_update@br0")
    for again in (pickle.loads(pickle.dumps(event)), copy.copy(event)):  # run -j sends evidence as a pickle
        assert again == event and _everything(again) == _everything(event)
    assert "key=" not in repr(event)  # what it is worked out from, not the slots that repeat it


def test_a_format_compiles_its_parser_when_first_used() -> None:
    """A session reads some 24 formats and a one-packet trace sees a few kinds: compiling happens on use."""
    fmt = tracefs.parse_format(FORMAT, "net")
    assert "pattern" not in vars(fmt)
    assert fmt.parse_body("skbaddr=ffff888108767f00") == {"skbaddr": 0xFFFF888108767F00}
    assert "pattern" in vars(fmt)
