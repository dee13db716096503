"""inject, send, listen and capture on running labs (real kernel, root).

The blocking side (capture, listen) runs as a real ``labctl`` process so the
other side can act while it waits, and so that SIGTERM is tested on the real
thing; the acting side runs in-process with CliRunner.  Each subprocess says
on stderr when its socket is open ("capturing on", "listening on", as
tcpdump does), so no test sleeps on a guess.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from labctl.cli.traffic import register
from labctl.kernel import netns
from labctl.kernel.sockets import send_udp
from tests.conftest import LabFactory
from tests.topologies import VMS as VM

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PAIR = """\
topology:
  nodes:
    c1:
      interfaces:
        eth0: {addresses: [192.168.9.2/24]}
    c2:
      interfaces:
        eth0: {addresses: [192.168.9.3/24]}
  links:
    - endpoints: ["c1:eth0", "c2:eth0"]
"""


UDP = "IP(dst='192.168.9.3')/UDP(sport=4000, dport=5000)/Raw(b'hi')"

# labctl's traffic commands on an app of their own (a callback keeps them sub-commands)
APP_SOURCE = """\
import typer
from labctl.cli.traffic import register
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.callback()(lambda: None)
register(app)
app(prog_name="labctl")
"""


def make_app() -> typer.Typer:
    """The same app as APP_SOURCE, in this process."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    register(app)
    return app


APP = make_app()


def run(*args: str) -> Result:
    return CliRunner().invoke(APP, list(args))


class Labctl:
    """A ``labctl`` command running in the background, read line by line without blocking forever."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", APP_SOURCE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        self.stderr: list[str] = []

    def _line(self, stream: Any, timeout: float) -> str | None:
        ready, _, _ = select.select([stream], [], [], timeout)
        return stream.readline().decode() if ready else None

    def ready(self, timeout: float = 10.0) -> None:
        """Until the command says its socket is open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self._line(self.proc.stderr, deadline - time.monotonic())
            if not line:
                break
            self.stderr.append(line)
            if line.startswith(("capturing on", "listening on", "holding the socket")):
                return
        self.proc.kill()
        raise AssertionError(f"not ready: {''.join(self.stderr)}{self.proc.stderr.read().decode()}")  # type: ignore[union-attr]

    def json_line(self, timeout: float = 5.0) -> dict[str, Any]:
        line = self._line(self.proc.stdout, timeout)
        assert line, "no output line in time"
        return dict(json.loads(line))

    def finish(self, timeout: float = 10.0) -> tuple[int, list[dict[str, Any]], str]:
        """Exit code, remaining JSON lines of stdout, all of stderr."""
        out, err = self.proc.communicate(timeout=timeout)
        lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        return self.proc.returncode, lines, "".join(self.stderr) + err.decode()


def test_inject_then_capture_count_and_pcap(make_lab: LabFactory, lab_name: str, tmp_path: Path) -> None:
    make_lab(PAIR)
    pcap = tmp_path / "out.pcap"
    cap = Labctl("capture", lab_name, "c2:eth0", "-f", "udp port 5000", "-c", "3", "-w", str(pcap), "--print", "--json")
    cap.ready()
    result = run("inject", lab_name, "c1", UDP, "--count", "3")
    assert result.exit_code == 0, result.output
    assert "sent 3/3" in result.output and "UDP 192.168.9.2:4000 > 192.168.9.3:5000" in result.output
    assert "on c1:eth0" in result.output and "pps" in result.output

    code, lines, err = cap.finish()
    assert code == 0, err
    frames, stats = lines[:-1], lines[-1]
    assert [f["direction"] for f in frames] == ["in"] * 3 and {f["iface"] for f in frames} == {"eth0"}
    assert all("UDP 192.168.9.2:4000 > 192.168.9.3:5000" in f["summary"] for f in frames)
    assert stats == stats | {"type": "stats", "frames": 3, "lost": False, "drops": 0, "stopped_by": "count"}
    dump = subprocess.run(["tcpdump", "-nr", str(pcap)], capture_output=True, text=True, check=True)
    assert dump.stdout.count("192.168.9.2.4000 > 192.168.9.3.5000: UDP, length 2") == 3


def test_send_to_listener_then_sigterm(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(PAIR)
    listener = Labctl("listen", lab_name, "c2", "udp", ":5000", "--json")
    listener.ready()
    result = run("send", lab_name, "c1", "udp", "192.168.9.3:5000", "--payload", "hi", "--count", "2")
    assert result.exit_code == 0, result.output
    assert "sent 2/2 udp datagrams from c1 to 192.168.9.3:5000" in result.output
    seen = [listener.json_line(), listener.json_line()]
    assert [(d["type"], d["length"], d["payload"]) for d in seen] == [("datagram", 2, "b'hi'")] * 2
    assert seen[0]["source"].startswith("192.168.9.2:")
    listener.proc.send_signal(signal.SIGTERM)
    code, lines, err = listener.finish()
    assert code == 0, err
    assert lines[-1] == lines[-1] | {"type": "stats", "read": 2, "drops": 0, "stopped_by": "SIGTERM"}

    unreachable = run("send", lab_name, "c1", "udp", "10.77.0.1:5000", "--count", "2")
    assert unreachable.exit_code == 1
    assert "sent 0/2" in unreachable.output and "ENETUNREACH ×2" in unreachable.output


def test_listen_no_read_reports_queue_and_drops(make_lab: LabFactory, lab_name: str) -> None:
    """A tiny unread queue fills; the report shows bytes still queued and the drops."""
    make_lab(PAIR)
    sender = netns.namespace_name(lab_name, "c1")
    done = threading.Event()

    def keep_sending() -> None:  # before the bind these bounce off a closed port: harmless
        while not done.wait(0.05):
            send_udp(sender, "192.168.9.3", 5000, b"x" * 100, count=10)

    thread = threading.Thread(target=keep_sending)
    thread.start()
    try:
        result = run("listen", lab_name, "c2", "udp", ":5000", "--no-read", "--rcvbuf", "1", "--timeout", "0.5")
    finally:
        done.set()
        thread.join()
    assert result.exit_code == 0, result.output
    assert "holding the socket unread on c2 udp 0.0.0.0:5000" in result.output
    summary = result.output.strip().splitlines()[-1]
    assert "0 datagrams read" in summary and "stopped by timeout" in summary
    queued = int(summary.split("datagrams read, ")[1].split(" bytes")[0])
    drops = int(summary.split("), ")[1].split(" drops")[0])
    assert queued > 0 and drops > 0, summary


def test_vm_inject_goes_out_its_tap_to_the_host(make_lab: LabFactory, lab_name: str, tmp_path: Path) -> None:
    """The VM's frame leaves its NIC (a tap), the relay carries it, the host tap receives it."""
    make_lab(VM)
    cap = Labctl("capture", lab_name, "host:tap1", "-f", "arp", "--json")
    cap.ready()
    lab_file = str(tmp_path / f"{lab_name}.yaml")  # LAB may also be the lab's file
    result = run("inject", lab_file, "vm1", "Ether(dst='ff:ff:ff:ff:ff:ff')/ARP(pdst='192.168.3.1')")
    assert result.exit_code == 0, result.output
    assert "on vm1:eth0" in result.output
    frame = cap.json_line()
    assert (frame["iface"], frame["direction"], frame["pkttype"]) == ("tap1", "in", "broadcast")
    assert "ARP who has 192.168.3.1 says 192.168.3.102" in frame["summary"]
    cap.proc.send_signal(signal.SIGTERM)
    code, lines, err = cap.finish()
    assert code == 0, err
    assert lines[-1] == lines[-1] | {"type": "stats", "frames": 1, "lost": False, "stopped_by": "SIGTERM"}


def test_capture_that_lost_frames_says_so(make_lab: LabFactory, lab_name: str, tmp_path: Path) -> None:
    """A one-page ring cannot keep a burst: red warning, "lost" in JSON, exit 1."""
    make_lab(PAIR)
    pcap = tmp_path / "lost.pcap"  # -w: no per-frame printing, so the test is quick
    cap = Labctl("capture", lab_name, "c2:eth0", "-f", "udp", "-B", "4", "-w", str(pcap), "--json")
    cap.ready()
    assert run("inject", lab_name, "c1", UDP, "--count", "20000").exit_code == 0
    cap.proc.send_signal(signal.SIGTERM)  # drops are counted as frames arrive, so stopping now is fine
    code, lines, err = cap.finish()
    stats = lines[-1]
    assert code == 1, err
    assert stats["lost"] is True and stats["drops"] > 0 and stats["frames"] + stats["drops"] <= stats["packets"]
    assert "this capture is incomplete" in err


def test_bad_input_exits_2_with_a_clear_message(make_lab: LabFactory, lab_name: str) -> None:
    make_lab(PAIR)
    cases = [
        (["inject", lab_name, "c9", UDP], "lab {lab} has no node 'c9' (nodes: c1, c2)"),
        (["capture", lab_name, "c1:eth9"], "node c1 has no interface 'eth9' (it has: eth0, lo)"),
        (["inject", lab_name, "c1:", UDP], "expected NODE or NODE:IFACE"),
        (["inject", f"nolab{os.getpid()}", "c1", UDP], f"lab nolab{os.getpid()} is not up"),
        (["capture", lab_name, "c1", "-f", "udp prot 5"], "bad capture filter 'udp prot 5': can't parse filter"),
        (["listen", lab_name, "c2", "udp", ":5000", "--filter", "udp prot 5"], "can't parse filter expression"),
        (["send", lab_name, "c1", "udp", "c2:5000"], "'c2' is not an IPv4 address"),
        (["send", lab_name, "c1:eth0", "udp", "192.168.9.3:5000"], "name the node only (c1)"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.stderr and message.format(lab=lab_name) in result.stderr, (args, result.stderr)

    bad = "IP(dst='192.168.9.3')/UDP(dprt=5000)"
    result = run("inject", lab_name, "c1", bad)
    assert result.exit_code == 2
    assert "UDP has no field 'dprt'" in result.stderr
    lines = result.stderr.splitlines()
    caret = next(line for line in lines if "^" in line)
    source = lines[lines.index(caret) - 1]
    assert source.strip() == bad
    assert source[caret.index("^") :].startswith("dprt=5000") and caret.strip() == "^" * len("dprt=5000")
