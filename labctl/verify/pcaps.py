"""A check's captures as one pcapng file, each frame commented with the check's verdict (``run --pcap DIR``).

The evidence engine knows, for each capture of a check, what was expected
and what the kernel showed; Wireshark users look at frames.  So every frame
a check's capture took is written with its place (``node:iface``, direction,
namespace) and the verdict: the check's status and the rows that judged that
capture (``captured``, ``captured_direction``, ``captured_sources`` name it by
key).  ``tshark -r DIR/LAB.CHECK.pcapng -T fields -e frame.comment`` shows them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from labctl.expect.base import Row
from labctl.kernel import netns, pcap
from labctl.kernel.frames import Frame


def _row_words(row: Row) -> str:
    mark = "✓" if row.ok else "✗"
    return f"{mark} {row.what}: expected {row.expected}, observed {row.observed}"


def verdict(check: str, status: str, rows: Sequence[Row], key: str) -> str:
    """``check NAME: PASS; ✓ captured on c2:eth0: expected 1, observed 1`` -- the rows about capture ``key``."""
    about = [_row_words(r) for r in rows if key in r.what]
    return "; ".join([f"check {check}: {status.upper()}", *about])


def write_check_pcap(
    directory: str,
    lab: str,
    check: str,
    status: str,
    rows: Sequence[Row],
    frames: Mapping[str, list[Frame]],
) -> str | None:
    """Write ``DIR/LAB.CHECK.pcapng`` (frames of every capture, in time order); None when nothing was captured."""
    items = []
    for key, taken in frames.items():
        node = key.partition(":")[0]
        namespace = netns.namespace_name(lab, node)
        words = verdict(check, status, rows, key)
        items += [(pcap.Interface(node, f.ifname, namespace), f, words) for f in taken]
    if not items:
        return None
    items.sort(key=lambda item: item[1].timestamp_ns)
    os.makedirs(directory, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in check)
    path = os.path.join(directory, f"{lab}.{safe}.pcapng")
    pcap.write_pcapng_items(path, items)
    return path
