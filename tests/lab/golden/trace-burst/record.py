"""Re-record this golden window (root): ``.venv/bin/python tests/lab/golden/trace-burst/record.py``.

Two labs with the same names (bench/bench_trace.py's topology); a second process floods the same frame in
the second lab while this one injects 2000 frames in the first, traced with LEAN_EVENTS.  Writes the
format files, the trace_pipe text (gzip) and meta.json beside this file.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
sys.path.insert(0, str(REPO))

from labctl.evidence.window import BASE_EVENTS  # noqa: E402
from labctl.kernel import tracefs  # noqa: E402
from labctl.kernel.packet import Injector  # noqa: E402
from labctl.lab import build  # noqa: E402
from labctl.lab.labfile import load_lab  # noqa: E402
from labctl.lab.trace import LEAN_EVENTS  # noqa: E402
from labctl.lab.traffic import prepare_injection  # noqa: E402
from tests.lab.test_trace import NOISE  # noqa: E402
from tests.lab.test_trace_burst import TOPOLOGY  # noqa: E402

PACKET = "IP(dst='10.97.0.2')/UDP(dport=9)"


def main() -> None:
    labs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("burst-gold", "burst-goldn"):
            file = Path(tmp) / f"{name}.yaml"
            file.write_text(TOPOLOGY.replace("burst-gold", name))
            topo, _ = load_lab(str(file))
            build.up(topo, str(file))
            labs.append(topo)
        try:
            ours, other = labs
            frame = prepare_injection(ours, "client", None, PACKET)
            noise = prepare_injection(other, "client", None, PACKET)
            args = [sys.executable, "-c", NOISE, noise.namespace, noise.frame.hex(), "20", "0.0005"]
            proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
            events = tuple(dict.fromkeys((*BASE_EVENTS, *LEAN_EVENTS)))
            with tracefs.TraceSession(events) as session, Injector(frame.namespace, frame.ifname) as injector:
                tid = threading.get_native_id()
                since = time.monotonic()
                sent = injector.send(frame.frame, 2000)
                time.sleep(0.2)
                until = time.monotonic()
                data = session._read_available()
                enabled = list(session.formats)
            proc.terminate()
            proc.wait(5)
        finally:
            for topo in labs:
                build.down(topo.name)
    (HERE / "formats").mkdir(exist_ok=True)
    for event in enabled:
        system, _, name = event.partition(":")
        text = Path(f"{tracefs.TRACEFS}/events/{system}/{name}/format").read_text()
        (HERE / "formats" / f"{system}.{name}.format").write_text(text)
    (HERE / "trace.txt.gz").write_bytes(gzip.compress(data))
    meta = {"tid": tid, "sent": sent, "since": since, "until": until, "frame": frame.frame.hex(), "ifname": "eth0"}
    (HERE / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = data.count(b"\n")
    print(f"{lines} lines, {sent} frames sent by thread {tid}")


if __name__ == "__main__":
    main()
