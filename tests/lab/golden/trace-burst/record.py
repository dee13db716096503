"""Re-record the golden windows (root): ``.venv/bin/python tests/lab/golden/trace-burst/record.py [--rich]``.

Two labs with the same names (bench/bench_trace.py's topology); a second process floods the same frame in
the second lab while this one injects 2000 frames in the first, traced with LEAN_EVENTS (or 300 frames
with RICH_EVENTS -- fib lookups too -- into ``../trace-burst-rich``, beside a lighter flood).  Writes the
format files, the trace_pipe text (gzip) and meta.json.
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
from labctl.kernel.inject import Injector  # noqa: E402
from labctl.lab import build  # noqa: E402
from labctl.lab.labfile import load_lab  # noqa: E402
from labctl.lab.trace import LEAN_EVENTS, RICH_EVENTS  # noqa: E402
from labctl.lab.traffic import prepare_injection  # noqa: E402
from tests.lab.test_trace import NOISE  # noqa: E402
from tests.lab.test_trace_burst import TOPOLOGY  # noqa: E402

PACKET = "IP(dst='10.97.0.2')/UDP(dport=9)"


def main() -> None:
    rich = "--rich" in sys.argv[1:]
    out = HERE.parent / "trace-burst-rich" if rich else HERE
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
            flood = ("1", "0.002") if rich else ("20", "0.0005")  # rich: ~10 events a frame, fib lookups included
            args = [sys.executable, "-c", NOISE, noise.namespace, noise.frame.hex(), *flood]
            proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
            events = tuple(dict.fromkeys((*BASE_EVENTS, *(RICH_EVENTS if rich else LEAN_EVENTS))))
            session = tracefs.TraceSession(events, buffer_kb=16384)
            with session, Injector(frame.namespace, frame.ifname) as injector:
                tid = threading.get_native_id()
                since = time.monotonic()
                sent = injector.send(frame.frame, 300 if rich else 2000)
                time.sleep(0.2)
                until = time.monotonic()
                data = session._read_available()
                enabled = list(session.formats)
            proc.terminate()
            proc.wait(5)
        finally:
            for topo in labs:
                build.down(topo.name)
    (out / "formats").mkdir(parents=True, exist_ok=True)
    for event in enabled:
        system, _, name = event.partition(":")
        text = Path(f"{tracefs.TRACEFS}/events/{system}/{name}/format").read_text()
        (out / "formats" / f"{system}.{name}.format").write_text(text)
    (out / "trace.txt.gz").write_bytes(gzip.compress(data))
    meta = {"tid": tid, "sent": sent, "since": since, "until": until, "frame": frame.frame.hex(), "ifname": "eth0"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = data.count(b"\n")
    print(f"{lines} lines, {sent} frames sent by thread {tid}")


if __name__ == "__main__":
    main()
