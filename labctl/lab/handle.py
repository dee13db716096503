"""A lab as a Python object: bring it up, poke it, look at it, bring it down.

This is what the pytest ``lab`` fixture yields (:mod:`labctl.pytest_plugin`),
and what a script that drives a lab uses: the same calls as the commands
(``exec``, ``inject``, ``send``, ``capture``, counters, ``trace``, a check of
the file), without a process per call.  Names are resolved and checked as
the commands check them (:mod:`labctl.lab.live`), so a typo is a
:class:`~labctl.errors.LabctlError` that says what exists.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from labctl.errors import LabStateError
from labctl.kernel import netns
from labctl.lab import build, state
from labctl.lab.labfile import load_lab
from labctl.lab.live import LiveLab, prepare, send_frames
from labctl.topology.checks import LabFile

if TYPE_CHECKING:
    from labctl.kernel.capture import Capture
    from labctl.kernel.sockets import SendResult
    from labctl.lab.live import InjectResult
    from labctl.lab.trace.model import TraceResult
    from labctl.verify.results import CheckResult


class Lab:
    """One lab file, up under ``name`` (the file's own name unless another is given: then a
    renamed copy of the file is built, kept in a private folder until :meth:`down`).

    ``Lab(file)`` only loads and validates the file; :meth:`up` builds it and
    :meth:`down` removes it (or use it as a context manager).  A lab that is
    already up is refused: tests must not converge or remove a lab someone
    brought up by hand.
    """

    def __init__(self, file: str, name: str | None = None) -> None:
        self._copy_dir: str | None = None
        if name:  # a renamed copy, so `labctl trace NAME ...` finds the file the lab was built from
            file = self._renamed_copy(file, name)
        self.file = file
        self.topo: LabFile = load_lab(file)[0]
        self.name = self.topo.name
        self.live = LiveLab(name=self.name, file=file, topo=self.topo)
        self._built = False

    # ------------------------------------------------------------ lifetime

    def up(self) -> Lab:
        if state.load(self.name) is not None or netns.list_labctl(self.name):
            raise LabStateError(
                f"lab {self.name} is up already; a test would converge and remove it "
                f"(labctl down {self.name}, or give the fixture another name)"
            )
        build.up(self.topo, self.file)
        self._built = True
        return self

    def down(self) -> None:
        if self._built:
            build.down(self.name)
            self._built = False
        if self._copy_dir is not None:
            shutil.rmtree(self._copy_dir, ignore_errors=True)
            self._copy_dir = None

    def _renamed_copy(self, file: str, name: str) -> str:
        """The file with its top-level ``name:`` replaced (or added), in a private temporary folder."""
        text = Path(file).read_text(encoding="utf-8")
        line = f"name: {name}"
        text, found = re.subn(r"^name:.*$", line, text, count=1, flags=re.MULTILINE)
        self._copy_dir = tempfile.mkdtemp(prefix="labctl-lab-")
        copy = Path(self._copy_dir) / f"{name}.yaml"
        copy.write_text(text if found else f"{line}\n{text}", encoding="utf-8")
        return str(copy)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------ doing things

    def namespace(self, node: str) -> str:
        return self.live.namespace(node)

    def exec(
        self, node: str, *command: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside ``node`` (``ip netns exec``: its own sysfs too); output as text."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace(node), *command],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def inject(self, target: str, packet: str, count: int = 1, rate: float | None = None) -> InjectResult:
        """Inject a Scapy expression on ``NODE[:IFACE]``, completed from the lab as ``labctl inject`` does."""
        where = self.live.target(target)
        return send_frames(prepare(where, packet), where.node, count, rate)

    def send(self, node: str, to: str, payload: bytes = b"labctl", count: int = 1) -> SendResult:
        """UDP datagrams from the node's own stack to ``ADDR:PORT`` (OUTPUT, routing, qdisc)."""
        from labctl.kernel.sockets import send_udp
        from labctl.lab.live import parse_endpoint

        where = self.live.target(node, allow_iface=False)
        address, port = parse_endpoint(to)
        return send_udp(where.namespace, address, port, payload, count=count)

    @contextlib.contextmanager
    def capture(self, target: str, bpf_filter: str | None = None) -> Iterator[Capture]:
        """A running capture on ``NODE[:IFACE]``; after the block, ``.frames`` holds what it saw."""
        from labctl.kernel.capture import Capture
        from labctl.lab.live import check_capture_filter

        check_capture_filter(bpf_filter)
        where = self.live.target(target)
        capture = Capture(where.namespace, where.ifname, bpf_filter)
        capture.start()
        try:
            yield capture
        finally:
            capture.stop()
            capture.close()

    def counters(self, node: str) -> dict[str, int]:
        """The node's counters now: snmp/netstat (``Udp.NoPorts``) and links (``eth0.rx_packets``)."""
        from labctl.kernel import counters

        namespace = self.namespace(node)
        values = dict(counters.snmp(namespace))
        for ifname, stats in counters.link_stats(namespace).items():
            values.update({f"{ifname}.{key}": value for key, value in stats.items()})
        return values

    def trace(self, target: str, packet: str, count: int = 1) -> TraceResult:
        """``labctl trace``: inject and explain each skb's path (``.packets[0].ending.reason`` ...)."""
        from labctl.lab.live import parse_target
        from labctl.lab.trace import trace_packet

        node, ifname = parse_target(target)
        self.live.target(target)  # checks the node and interface exist
        return trace_packet(self.topo, node, packet, interface=ifname, count=count)

    def check(self, name: str) -> CheckResult:
        """Run one of the file's checks (as ``labctl run`` does) and return its result."""
        from labctl.verify.runner import run_check

        found = [c for c in self.topo.checks if c.name == name]
        if not found:
            known = ", ".join(c.name for c in self.topo.checks) or "none"
            raise LabStateError(f"{self.file} has no check {name!r} (checks: {known})")
        return run_check(self.topo, found[0])
