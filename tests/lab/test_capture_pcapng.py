"""``capture -w f.pcapng``: per-frame comments and one interface block per node:iface that tshark shows.

A real capture (``labctl capture`` as a process, a VLAN-tagged frame and an
untagged one injected by ``labctl inject``) is written as pcapng and read
back by tshark (installed with ``apt-get install tshark``; without it, by
Scapy's pcapng reader) and tcpdump.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from labctl.kernel import pcap
from labctl.kernel.frames import Frame
from tests.conftest import LabFactory
from tests.lab.test_traffic_cli import PAIR, Labctl, run

TAGGED = "Dot1Q(vlan=100)/IP(dst='192.168.9.3')/UDP(sport=4000, dport=5000)/Raw(b'hi')"
PLAIN = "IP(dst='192.168.9.3')/UDP(sport=4000, dport=5000)/Raw(b'hi')"


def _read_back(path: Path) -> list[tuple[str, str, str]]:
    """(interface name, direction 1=in/2=out, comment) per frame: tshark's view, else Scapy's."""
    if shutil.which("tshark"):
        fields = ["frame.interface_name", "frame.packet_flags_direction", "frame.comment"]
        argv = ["tshark", "-r", str(path), "-T", "fields", *(w for f in fields for w in ("-e", f))]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return [tuple(line.split("\t")) for line in out.splitlines()]  # type: ignore[misc]
    from scapy.utils import PcapNgReader

    rows = []
    with PcapNgReader(str(path)) as reader:
        for pkt in reader:
            flags = int(getattr(pkt, "direction", 0) or 0)
            comment = pkt.comment.decode() if isinstance(pkt.comment, bytes) else str(pkt.comment)
            rows.append(("?", str(flags), comment))
    return rows


def _frames() -> list[Frame]:
    data = bytes(range(60))
    return [Frame(1_700_000_000_123_456_789, "eth0", "host", data, 60), Frame(2, "eth1", "outgoing", data[:50], 50)]


def test_pcapng_has_an_interface_block_per_iface_and_a_comment_per_frame(tmp_path: Path) -> None:
    path = tmp_path / "f.pcapng"
    verdict = lambda f: "verdict: PASS" if f.ifname == "eth0" else None  # noqa: E731
    written = pcap.write(path, _frames(), node="c2", namespace="labctl-x.c2", comment=verdict)
    assert written == 2
    raw = path.read_bytes()
    assert struct.unpack_from("=I", raw)[0] == 0x0A0D0D0A
    assert raw.count(struct.pack("=I", 1)) >= 2  # two IDBs
    rows = _read_back(path)
    assert [r[2] for r in rows] == [
        "c2:eth0 in (host) netns labctl-x.c2; verdict: PASS",
        "c2:eth1 out (outgoing) netns labctl-x.c2",
    ]
    if shutil.which("tshark"):
        assert [r[0] for r in rows] == ["c2:eth0", "c2:eth1"] and [int(r[1], 0) for r in rows] == [1, 2]


def test_pcap_stays_classic_pcap(tmp_path: Path) -> None:
    path = tmp_path / "f.pcap"
    assert pcap.write(path, _frames(), node="c2", namespace="ns") == 2
    assert struct.unpack_from("=I", path.read_bytes())[0] == pcap.PCAP_MAGIC_NS
    dump = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and dump.stdout.count("ethertype") == 2


def test_capture_writes_pcapng_that_tshark_reads_with_vlan_filter(
    make_lab: LabFactory, lab_name: str, tmp_path: Path
) -> None:
    make_lab(PAIR)
    out = tmp_path / "out.pcapng"
    cap = Labctl("capture", lab_name, "c2", "-f", "vlan 100", "-c", "1", "-w", str(out), "--json")
    cap.ready()
    assert run("inject", lab_name, "c1", PLAIN).exit_code == 0  # no tag: the filter refuses it
    assert run("inject", lab_name, "c1", TAGGED).exit_code == 0  # received with its tag in skb metadata
    code, lines, err = cap.finish()
    assert code == 0, err
    assert lines[-1]["frames"] == 1 and lines[-1]["stopped_by"] == "count"
    rows = _read_back(out)
    assert len(rows) == 1
    assert rows[0][2] == f"c2:eth0 in (host) netns labctl-{lab_name}.c2"
    dump = subprocess.run(["tcpdump", "-enr", str(out)], capture_output=True, text=True, check=True)
    assert "vlan 100" in dump.stdout and "192.168.9.2.4000 > 192.168.9.3.5000" in dump.stdout


CHECKS = """
checks:
  - name: seen
    setup:
      capture: [{node: c2, interface: eth0, filter: "udp port 5000"}]
    traffic:
      - inject: {node: c1, packet: "IP(dst='192.168.9.3')/UDP(sport=4000, dport=5000)", count: 2}
    expect: {captured: {"c2:eth0": 2}}
  - name: miscounted
    setup:
      capture: [{node: c2, interface: eth0, filter: "udp port 5000"}]
    traffic:
      - inject: {node: c1, packet: "IP(dst='192.168.9.3')/UDP(sport=4000, dport=5000)", count: 1}
    expect: {captured: {"c2:eth0": 3}}
"""


def test_run_pcap_writes_each_checks_frames_with_its_verdict(lab_name: str, tmp_path: Path) -> None:
    from labctl.verify.runner import run_lab

    file = tmp_path / f"{lab_name}.yaml"
    file.write_text(f"name: {lab_name}\n{PAIR}{CHECKS}")
    result = run_lab(str(file), pcap_dir=str(tmp_path / "pcaps"))
    assert [c.status for c in result.checks] == ["pass", "fail"]
    seen, miscounted = (_read_back(Path(c.pcap or "")) for c in result.checks)
    where = f"c2:eth0 in (host) netns labctl-{lab_name}.c2"
    assert [r[2] for r in seen] == [f"{where}; check seen: PASS; ✓ captured on c2:eth0: expected 2, observed 2"] * 2
    assert [r[2] for r in miscounted] == [
        f"{where}; check miscounted: FAIL; ✗ captured on c2:eth0: expected 3, observed 1"
    ]
    assert result.checks[0].as_dict()["pcap"].endswith(f"{lab_name}.seen.pcapng")
