#!/usr/bin/env python3
"""Where a serial ``labctl run labs/`` spends its wall time: a table of causes, wait vs CPU.

The run is the product's own (``labctl.verify.runner.run_labs``, in this
process); the script only wraps the functions where a run waits -- fixed
sleeps, the nflog quiet period, TCP handshakes, ping, IPv6 DAD, tracefs
instance set-up, pausing and removal -- and times each call's *own* share (time spent
in a wrapped callee is counted to the callee).  Per row: wall seconds, the
calling thread's CPU seconds, and the rest (waiting: for the kernel, a timer,
a child process, or a core another process holds).

    .venv/bin/python bench/bench_run_waits.py labs/          # every lab, serially
    .venv/bin/python bench/bench_run_waits.py labs/nat.yaml  # one lab

Each row is a real wait or cost of the run; "(not wrapped)" is whatever the
wrapped rows do not cover (YAML loading, judging, the stage's rules).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_local = threading.local()
WALL: dict[str, float] = defaultdict(float)
CPU: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def _wrap(label: str | Callable[..., str], func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return func(*args, **kwargs)
        name = label(*args, **kwargs) if callable(label) else label
        stack: list[list[float]] = getattr(_local, "stack", None) or []
        _local.stack = stack
        frame = [0.0, 0.0]  # wall, cpu of wrapped callees
        stack.append(frame)
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return func(*args, **kwargs)
        finally:
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
            stack.pop()
            WALL[name] += wall - frame[0]
            CPU[name] += cpu - frame[1]
            CALLS[name] += 1
            if stack:
                stack[-1][0] += wall
                stack[-1][1] += cpu

    return timed


def _patch(path: str, label: str | Callable[..., str]) -> None:
    module_name, _, attr = path.rpartition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    setattr(owner, name, _wrap(label, getattr(owner, name)))


def _send_label(topo: Any, index: int, step: Any, *args: Any, **kwargs: Any) -> str:
    t = step.traffic
    kind = next(k for k in ("exec", "tcp", "inject", "udp", "ping") if getattr(t, k) is not None)
    return {
        "tcp": "traffic: tcp (handshakes, SYN retransmit timers)",
        "ping": "traffic: ping (child process, reply timeout -W 1)",
        "exec": "traffic: exec (a program)",
        "inject": "traffic: inject",
        "udp": "traffic: udp send",
    }[kind]


def _settle_label(window: Any, fixed: float | None = None) -> str:
    return "traffic: settle after a step, fixed (settle: N)" if fixed is not None else "traffic: settle until quiet"


WRAPPED: list[tuple[str, str | Callable[..., str]]] = [
    ("labctl.lab.build:up", "lab up (build)"),
    ("labctl.lab.settle:settle", "lab up: waiting for links (operstate)"),
    ("labctl.lab.settle:settle_ipv6", "lab up: IPv6 DAD"),
    ("labctl.lab.build:down", "lab down"),
    ("labctl.verify.stage:warm_neighbours", "stage: warm-up ping (neighbour resolution)"),
    ("labctl.verify.stage:flush_conntrack", "stage: conntrack flush"),
    ("labctl.verify.stage:_send", _send_label),
    ("labctl.kernel.tracefs:TraceSession.start", "window: tracefs instance create + enable"),
    ("labctl.kernel.tracefs:TraceSession.stop", "window: tracefs disable + drain + rmdir"),
    ("labctl.kernel.tracefs.kept:KeptSession.resume", "window: kept tracefs instance resumed"),
    ("labctl.kernel.tracefs.kept:KeptSession.pause", "window: kept tracefs instance paused + drained"),
    ("labctl.kernel.nftrace:HookTracer.__enter__", "window: nflog trace rules install"),
    ("labctl.kernel.nftrace:HookTracer._teardown", "window: nflog trace rules removal"),
    ("labctl.kernel.nftrace:NflogListener.drain", "window: nflog drain (quiet period)"),
    ("labctl.kernel.counters:Snapshot.take", "window: counter snapshots"),
    ("labctl.kernel.tcp:TcpListener.wait_idle", "window: tcp listener idle wait"),
    ("labctl.evidence.window:attribute", "window: attribution (CPU)"),
    ("labctl.evidence.window:Window.settle", _settle_label),
    ("labctl.evidence.window:Window._open", "window: open (captures, watches)"),
    ("labctl.evidence.window:Window.close", "window: close (other readers)"),
    ("labctl.verify.runner:judge", "judge"),
    ("labctl.verify.runner:run_lab", "(not wrapped)"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["labs"])
    args = parser.parse_args()
    for path, label in WRAPPED:
        _patch(path, label)
    from labctl.verify import runner, scope

    files = scope.lab_files(args.paths)
    load0 = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    results, _ = runner.run_labs(files)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    failed = [f"{r.lab}:{c.name}" for r in results for c in r.checks if c.status in ("fail", "error")]
    failed += [f"{r.lab}: {r.error}" for r in results if r.error]
    print(f"{len(files)} labs, {sum(len(r.checks) for r in results)} checks, failed: {failed or 'none'}")
    print(f"wall {wall:.2f} s, process CPU {cpu:.2f} s, load average {load0:.1f} at the start, "
          f"{os.cpu_count()} cores")
    print(f"{'cause':<52} {'calls':>6} {'wall s':>8} {'cpu s':>7} {'wait s':>7}")
    for name in sorted(WALL, key=lambda n: -WALL[n]):
        print(f"{name:<52} {CALLS[name]:>6} {WALL[name]:>8.2f} {CPU[name]:>7.2f} {WALL[name] - CPU[name]:>7.2f}")
    print(f"{'sum':<52} {'':>6} {sum(WALL.values()):>8.2f} {sum(CPU.values()):>7.2f}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
