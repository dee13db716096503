"""``labctl run --html``: the page, its pcaps and path pictures, and the page in a real browser.

The lab is built on the real kernel (named ``th<pid>`` so no one else's lab
collides with it).  The browser test needs Debian's ``chromium``: it is
skipped, saying so, where chromium is not installed (``./setup.sh`` does not
install it, it is large; ``.ci/run`` does, so CI runs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds namespaces: needs root")

LABCTL = [sys.executable, "-m", "labctl.cli"]
LAB = """\
name: {name}
topology:
  nodes:
    client:
      interfaces:
        eth0: {{addresses: [10.8.1.2/24]}}
      routes: [{{dst: default, via: 10.8.1.1}}]
    r1:
      sysctls: {{net.ipv4.ip_forward: 1}}
      interfaces:
        eth0: {{addresses: [10.8.1.1/24]}}
        eth1: {{addresses: [10.8.2.1/24]}}
    server:
      interfaces:
        eth0: {{addresses: [10.8.2.2/24]}}
      routes: [{{dst: default, via: 10.8.2.1}}]
  links:
    - endpoints: ["client:eth0", "r1:eth0"]
    - endpoints: ["r1:eth1", "server:eth0"]
checks:
  - name: closed-port-behind-a-router
    covers: [R7]
    description: Forwarded by r1, then dropped by server's UDP (no socket).
    setup:
      capture: [{{node: server, interface: eth0, filter: "udp port 5999"}}]
    traffic:
      - inject: {{node: client, packet: "IP(dst='10.8.2.2')/UDP(dport=5999)"}}
    expect:
      dropped: {{reason: NO_SOCKET, at: __udp4_lib_rcv}}
      captured: {{"server:eth0": 1}}
      hooks: {{r1: [raw:PREROUTING, mangle:PREROUTING, mangle:FORWARD, filter:FORWARD, security:FORWARD,
                    mangle:POSTROUTING]}}
  - name: wrong-on-purpose
    description: Expects a delivery that cannot happen, so the page shows a FAIL with its hint.
    setup:
      listen: [{{node: server, port: 5000}}]
    traffic:
      - inject: {{node: client, packet: "IP(dst='10.8.2.2')/UDP(dport=5999)"}}
    expect:
      delivered: 1
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One run of the lab with --html (exit 1: one check fails on purpose)."""
    folder = tmp_path_factory.mktemp("html")
    name = f"th{os.getpid()}"
    file = folder / f"{name}.yaml"
    file.write_text(LAB.format(name=name))
    out = folder / "out" / "report.html"
    result = subprocess.run(
        [*LABCTL, "run", str(file), "--html", str(out)], capture_output=True, text=True, timeout=180
    )
    subprocess.run([*LABCTL, "down", name], capture_output=True, timeout=60)  # only if the run left it
    return out, result


def test_the_page_has_verdicts_rows_pictures_and_pcap_links(
    report: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, result = report
    assert result.returncode == 1, result.stdout + result.stderr
    page = out.read_text()
    assert "closed-port-behind-a-router" in page and "wrong-on-purpose" in page
    assert page.count('<span class="badge">PASS</span>') >= 1 and '<span class="badge">FAIL</span>' in page
    assert "hint:" in page  # the failing row's hint
    assert page.count("<svg") >= 2  # a path picture per check
    assert "✗ dropped: NO_SOCKET" in page and "__udp4_lib_rcv+" in page  # reason and location in the picture
    assert "1: eth0 → eth0" in page and "2: eth1 → eth0" in page  # the hops, numbered
    assert "ip:filter:FORWARD" in page  # the netfilter chains it passed on r1
    assert not re.search(r"""(src|href)=["']https?://""", page), "the page must not fetch anything"
    pcap = re.search(r'href="(report-pcaps/[^"]+\.pcap)"', page)
    assert pcap is not None
    data = (out.parent / pcap.group(1)).read_bytes()
    assert data[:4] in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x0a\x0d\x0d\x0a")  # pcap (ns) or pcapng
    if shutil.which("tcpdump"):
        shown = subprocess.run(["tcpdump", "-nr", str(out.parent / pcap.group(1))], capture_output=True, text=True)
        assert "10.8.2.2.5999" in shown.stdout


CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="headless browser test: apt-get install chromium (CI's .ci/run does)")
def test_the_page_renders_in_headless_chromium(
    report: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    out, _ = report
    assert CHROMIUM is not None
    url = out.resolve().as_uri()
    base = [CHROMIUM, *FLAGS]
    dom = subprocess.run(
        [*base, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "closed-port-behind-a-router" in dom.stdout and "wrong-on-purpose" in dom.stdout
    assert dom.stdout.count("<svg") >= 2 and "<figure" in dom.stdout  # the pictures are in the rendered DOM
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a page with pictures, not a blank one
    keep = os.environ.get("LABCTL_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
