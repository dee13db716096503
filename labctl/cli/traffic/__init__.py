"""Traffic commands: inject, send, listen, capture -- a running lab's packets by hand.

``inject`` writes a frame onto a node's interface with AF_PACKET (the node's
stack never sees it leave; a VM's frame goes out its tap to the relay);
``send`` uses the node's own UDP socket, so routing, netfilter and the
neighbour layer run and their errno is the answer; ``listen`` is the
receiving application, with the socket knobs that decide drops at the end
of the receive path; ``capture`` is tcpdump inside a node, and says when the
kernel dropped frames the capture could not keep (an incomplete capture is
not evidence).

Conventions: bad input (unknown node or interface, bad expression, filter or
address) exits 2; what the kernel refused exits 1; ``listen`` and
``capture`` stop cleanly on Ctrl-C *and* SIGTERM (sockets closed, pcap
written, statistics printed); ``inject`` stopped early reports what it sent
and exits 130.  Frame and datagram lines go to stdout as they come (plain
text or JSON lines); the closing statistics of ``listen``/``capture`` go to
stderr in text mode, like tcpdump's, so stdout pipes cleanly.

One module a job: :mod:`.inject`, :mod:`.sockets` (send, listen), :mod:`.capture` (with the ring's bound),
and :mod:`.shared` (resolving the lab, signals, streamed output); this one registers the commands.
"""

from __future__ import annotations

import typer

from labctl.cli.common import reports_errors
from labctl.cli.traffic import capture, inject, sockets


def register(app: typer.Typer) -> None:
    """Add the traffic commands to ``app`` (labctl's, or a test's own)."""
    for func in (inject.inject, sockets.send, sockets.listen, capture.capture):
        app.command(name=func.__name__)(reports_errors(func))
