"""Where a lab's packet went in the kernel, and why it stopped there.

``labctl trace`` answers the first question a reader of the notes asks: *where
did my packet go?*  It injects a frame on a node's interface (the frame
``labctl inject`` would send), records the kernel's tracepoints in a private
tracefs instance, and tells that skb's story in the notes' vocabulary::

    client eth0 ─tx→ server eth0: netif_rx → backlog (cpu1) → netif_receive_skb
      → AF_PACKET tap (1 socket) → ip_rcv → PREROUTING → routing: local → LOCAL_IN → UDP
      ✗ dropped: NO_SOCKET at __udp4_lib_rcv   (Udp NoPorts +1, ICMP port unreachable sent)

Three problems shape the code.

**Attribution.**  Tracepoints are global and device names are not unique
(every lab has an eth0).  An injected skb is recognised by its *first* event:
``net_dev_queue`` on the injecting device, run by the injecting thread in its
own call (not in a softirq it lent its context to), with the frame's length.
From there it is followed by address until it is freed, whichever CPU or task
runs the later stages (RPS, NAPI, ksoftirqd).  Skbs born from ours -- in our
thread, right after one of our events on the same CPU, on a device of that
node (the ARP exchange, the ICMP error) -- are reported as *related*.
Nothing else is adopted, however similar.

**Placement.**  A device event names a device, not a namespace.  The node is
resolved from the lab: the injecting node for the first transmit, the far
end of the link (``topo.links``) for the receive that follows a transmit, the
node the skb is already on for its other devices (a bridge, ``lo``, the way
out of a router), a device name only one node has, the node the same CPU was
working in just before (for related skbs), the task's network namespace
(``--follow``), and the fib lookup the receiver made (its input ifindex and
the packet's addresses, which the topology assigns to nodes).  A VM relay
copies a frame into a new skb: the path goes on with the skb that relay
writes on the far tap, with the same length.  What cannot be placed is shown
raw, never dropped.

**Evidence.**  Much of the path has no tracepoint on this kernel (no
kprobes): ip_rcv, the netfilter hooks, routing and UDP do not.  Every stage
says how it is known -- ``traced`` (a tracepoint of this skb or of the
lookup it made), ``counted`` (a counter of that node moved during the trace:
snmp/netstat, a rule counter, softnet_stat, link stats) or ``inferred``
(the code path between two stages with evidence must have run).  Nothing is
claimed past the last stage with evidence, and counters are always shown as
deltas over the trace, so with ``count`` > 1 or other traffic in the lab they
count every packet, not one.

The package, in the order the analysis runs:

- :mod:`.model`: the results (stages, endings, paths) and their ``--json`` fields;
- :mod:`.frame`: the injected frame's headers; :mod:`.vocabulary`: the notes' words
  for kernel functions and drop reasons;
- :mod:`.knowledge`: the lab (devices, links, sockets, fib lookups, counter deltas);
  :mod:`.rules`: iptables rule counters;
- :mod:`.placement`: which node each event happened in;
- :mod:`.path` and :mod:`.upper`: a placed skb as stages and an ending;
- :mod:`.explain`: which skbs are ours, across VM relays; :mod:`.inject`:
  :func:`trace_packet` and :func:`trace_frame`;
- :mod:`.tasks` and :mod:`.follow`: the live view (:class:`Follower`).
"""

from labctl.kernel.inject import Injector  # what trace_frame sends with (tests patch Injector.send)
from labctl.lab.trace.explain import explain
from labctl.lab.trace.follow import Follower
from labctl.lab.trace.frame import FrameInfo
from labctl.lab.trace.inject import LEAN_EVENTS, RICH_EVENTS, trace_frame, trace_packet
from labctl.lab.trace.knowledge import Knowledge
from labctl.lab.trace.model import (
    Ending,
    Evidence,
    Fate,
    FollowSummary,
    PacketPath,
    RuleDelta,
    Segment,
    Stage,
    TraceResult,
)
from labctl.lab.trace.path import PathBuilder
from labctl.lab.trace.placement import Placer, Timeline
from labctl.lab.trace.rules import rule_words
from labctl.lab.trace.tasks import TaskMap

__all__ = [
    "LEAN_EVENTS",
    "RICH_EVENTS",
    "Ending",
    "Evidence",
    "Fate",
    "FollowSummary",
    "Follower",
    "FrameInfo",
    "Injector",
    "Knowledge",
    "PacketPath",
    "PathBuilder",
    "Placer",
    "RuleDelta",
    "Segment",
    "Stage",
    "TaskMap",
    "Timeline",
    "TraceResult",
    "explain",
    "rule_words",
    "trace_frame",
    "trace_packet",
]
