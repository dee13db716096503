"""A FAIL in words: where each of the check's packets went and why it stopped, in the notes' vocabulary.

The words are the ones ``labctl trace`` uses (the stage names of the kernel
layer, the drop stage of the trace vocabulary).  Only the lab's packets are
shown -- the evidence is already attributed -- so labctl's own netlink
traffic never appears.
"""

from __future__ import annotations

from labctl.evidence.model import Evidence, Packet
from labctl.expect.kinds.drops import HINTS
from labctl.kernel.tracefs import stage_of
from labctl.lab.trace.vocabulary import drop_stage

ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6"}
MAX_PACKETS = 6


def _step(event: object) -> str:
    name = stage_of(event)  # type: ignore[arg-type]
    devices = getattr(event, "devices", ())
    return f"{name}@{devices[0]}" if devices else name


def packet_story(index: int, packet: Packet) -> str:
    kind = ETHERTYPES.get(packet.protocol or 0, "skb")
    steps: list[str] = []
    for event in packet.events:
        step = _step(event)
        if not steps or steps[-1] != step:
            steps.append(step)
    ending = ""
    drop = packet.drop
    if drop is not None:
        where = drop_stage(drop.reason, drop.function)
        hint = HINTS.get(drop.reason or "", "")
        ending = f"  ✗ {where or 'dropped'}: {drop.reason} at {drop.function}" + (f" — {hint}" if hint else "")
        steps = steps[:-1]
    elif packet.fate == "consumed":
        ending = "  ✓ consumed"
    else:
        ending = "  … still queued or merged when the window closed"
    return f"packet {index} ({kind}): {' → '.join(steps) or '(no step traced)'}{ending}"


def explain(evidence: Evidence) -> list[str]:
    """One line per packet of the lab (the first few), plus the notifications its namespaces heard."""
    lines = [packet_story(i + 1, p) for i, p in enumerate(evidence.packets[:MAX_PACKETS])]
    if len(evidence.packets) > MAX_PACKETS:
        lines.append(f"… and {len(evidence.packets) - MAX_PACKETS} more packets (--json has them all)")
    if not evidence.packets:
        lines.append("no packet of this lab was traced in the window")
    for node, notes in evidence.notifications.items():
        lines.append(f"{node} heard: {', '.join(notes[:6])}")
    return lines
