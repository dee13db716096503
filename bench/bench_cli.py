#!/usr/bin/env python3
"""labctl as users run it -- whole commands in new processes -- against ``ip -batch`` in the same run.

Rows (each the median of ``--runs`` runs; the baseline is timed in the same
run, interleaved with labctl, so machine load weighs on both sides):

* ``star N``: ``labctl up star.yaml && labctl down LAB`` for N hosts on one
  bridge, vs iproute2 doing the same operations (namespaces, bridge, veths,
  links up, addresses; then deleting the namespaces).
* ``chain N``: N routers in a line, one /24 per link, each router with a
  default route towards r0 and a route to the far stub network towards the
  other end (static routes), vs iproute2 doing the same.
* ``converge``: a second ``labctl up`` of the unchanged largest star (nothing
  to do), and ``labctl status LAB`` / ``--json`` on it.
* ``--help``: ``labctl --help`` and ``labctl validate`` of a two-node file,
  beside a bare ``python -c pass`` and, as validate's floor, a new interpreter
  that only imports Typer, PyYAML and pydantic's BaseModel.
* ``trace``: ``labctl trace LAB client PACKET`` (one packet, a new process)
  on a two-node lab; its floor adds Rich and Scapy's Ethernet/IPv4 layers.
* ``run``: ``labctl run labs/`` serially and with ``-j 2``, ``-j 4``, ``-j 6``
  (labs in parallel; ``--jobs``), and which ``-j`` was fastest.  The labs have
  fixed names: another user's run of the same labs at the same time makes a
  run refuse ("up already"), which the row reports.

labctl's modules are byte-compiled first (``compileall``), as an installed
package is: with ``PYTHONDONTWRITEBYTECODE`` set an editable checkout would
otherwise compile every module on every start.

``ip -batch`` cannot switch namespace per line, so the baseline is one batch in
the root namespace (``netns add``), one per namespace that creates veths, and
one ``ip -n NS -batch`` per namespace for its addresses and routes: the fastest
way to do it with iproute2.  labctl also turns IPv6 off in every namespace (two
sysctl writes each) and waits until every link is operationally up, which the
baseline does not.

Nothing touches the root namespace: every namespace is created here (names
``labctl-bn*``, so ``labctl clean --lab NAME`` finds leftovers) and deleted
again, even when a step fails.

    python bench/bench_cli.py                        # star 200,1000, chain 200, 5 runs
    python bench/bench_cli.py --sizes 50 --chain 20 --runs 3   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LABCTL = os.environ.get("LABCTL", str(Path(sys.executable).with_name("labctl")))
"""The command under test (LABCTL=... to time another checkout)."""
PREFIX = "labctl-"  # labctl's namespace prefix: leftovers of the baseline are found by clean too


def star_yaml(lab: str, n: int) -> str:
    lines = [f"name: {lab}", "topology:", "  nodes:", "    sw:", "      bridges:"]
    lines.append(f"        br0: {{ports: [{', '.join(f'p{i}' for i in range(n))}]}}")
    for i in range(n):
        lines += [f"    h{i}:", "      interfaces:", f"        eth0: {{addresses: [{star_address(i)}]}}"]
    lines.append("  links:")
    lines += [f'    - endpoints: ["h{i}:eth0", "sw:p{i}"]' for i in range(n)]
    return "\n".join(lines) + "\n"


def star_address(i: int) -> str:
    return f"10.{100 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}/8"


def chain_subnet(i: int) -> str:
    """The /24 of link i (between r<i> and r<i+1>), without the host part."""
    return f"10.{i // 250}.{i % 250}"


STUB = "10.255.0.0/16"  # the far end's network, reached through the whole chain


def chain_routes(i: int, n: int) -> list[tuple[str, str]]:
    routes = []
    if i > 0:
        routes.append(("default", f"{chain_subnet(i - 1)}.1"))
    if i < n - 1:
        routes.append((STUB, f"{chain_subnet(i)}.2"))
    return routes


def chain_addresses(i: int, n: int) -> dict[str, str]:
    found = {}
    if i > 0:
        found["e0"] = f"{chain_subnet(i - 1)}.2/24"
    if i < n - 1:
        found["e1"] = f"{chain_subnet(i)}.1/24"
    if i == n - 1:
        found["lo"] = "10.255.0.1/16"
    return found


def chain_yaml(lab: str, n: int) -> str:
    lines = [f"name: {lab}", "topology:", "  nodes:"]
    for i in range(n):
        lines += [f"    r{i}:", "      interfaces:"]
        lines += [f"        {ifname}: {{addresses: [{cidr}]}}" for ifname, cidr in chain_addresses(i, n).items()]
        routes = chain_routes(i, n)
        if routes:
            lines.append("      routes:")
            lines += [f"        - {{dst: {dst}, via: {via}}}" for dst, via in routes]
    lines.append("  links:")
    lines += [f'    - endpoints: ["r{i}:e1", "r{i + 1}:e0"]' for i in range(n - 1)]
    return "\n".join(lines) + "\n"


# -- the iproute2 baseline ---------------------------------------------------
def ip_batch(argv: list[str], lines: list[str]) -> None:
    subprocess.run(["ip", *argv, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)


def ip_star_up(lab: str, n: int) -> list[str]:
    sw = f"{PREFIX}{lab}.sw"
    hosts = [f"{PREFIX}{lab}.h{i}" for i in range(n)]
    ip_batch([], [f"netns add {name}" for name in [sw, *hosts]])
    switch = ["link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up", "link set lo up"]
    for i, host in enumerate(hosts):
        switch += [f"link add p{i} type veth peer name eth0 netns {host}", f"link set p{i} master br0 up"]
    ip_batch(["-n", sw], switch)
    for i, host in enumerate(hosts):
        ip_batch(["-n", host], ["link set lo up", "link set eth0 up", f"addr add {star_address(i)} dev eth0"])
    return [sw, *hosts]


def ip_chain_up(lab: str, n: int) -> list[str]:
    names = [f"{PREFIX}{lab}.r{i}" for i in range(n)]
    ip_batch([], [f"netns add {name}" for name in names])
    for i, name in enumerate(names):
        lines = ["link set lo up"]
        if i < n - 1:
            lines += [f"link add e1 type veth peer name e0 netns {names[i + 1]}", "link set e1 up"]
        if i > 0:
            lines.append("link set e0 up")
        lines += [f"addr add {cidr} dev {ifname}" for ifname, cidr in chain_addresses(i, n).items()]
        lines += [f"route add {dst} via {via} proto static" for dst, via in chain_routes(i, n)]
        ip_batch(["-n", name], lines)
    return names


def ip_down(names: list[str]) -> None:
    ip_batch([], [f"netns del {name}" for name in names])


def ip_cleanup(lab: str) -> None:
    """Whatever a failed baseline run left (namespaces of this lab only)."""
    left = [name for name in os.listdir("/run/netns") if name.startswith(f"{PREFIX}{lab}.")]
    if left:
        ip_down(left)


# -- labctl as a user runs it -------------------------------------------------
CPU: dict[str, list[float]] = {}
"""CPU seconds (user + system) of each labctl command by its first word: on a loaded machine wall time
is mostly waiting for a core, so the CPU a command itself used is printed beside it."""


def labctl(*args: str, quiet: bool = True) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.DEVNULL if quiet else None
    subprocess.run([LABCTL, *args], check=True, stdout=out)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    CPU.setdefault(" ".join(a for a in args if not a.startswith("/")), []).append(used)
    return wall


def cpu(*args: str) -> str:
    """``(cpu 0.123s)``: the median CPU of the commands timed so far with these arguments (paths left out)."""
    used = CPU.get(" ".join(args), [])
    return f"(cpu {statistics.median(used):.3f}s)" if used else ""


def labctl_down(lab: str) -> None:
    subprocess.run([LABCTL, "down", lab], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def timed(step: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


# -- rows ---------------------------------------------------------------------
def baseline_name(lab: str) -> str:
    """The iproute2 baseline's lab name beside labctl's ``lab`` (bnstar200 -> bnipstar200)."""
    for kind in ("star", "chain"):
        if kind in lab:
            return lab.replace(kind, "ip" + kind, 1)
    return lab + "ip"


def up_down_row(label: str, file: Path, lab: str, baseline: Callable[[], list[str]], runs: int) -> float:
    """Median (labctl up+down) / median (ip up+down), printed; returns the ratio."""
    ip_times: list[float] = []
    lc_times: list[float] = []
    lc_up: list[float] = []
    base_lab = baseline_name(lab)
    for _ in range(runs):
        try:
            t0 = time.perf_counter()
            names = baseline()
            ip_down(names)
            ip_times.append(time.perf_counter() - t0)
        finally:
            ip_cleanup(base_lab)
        try:
            up_s = labctl("up", str(file))
            lc_up.append(up_s)
            lc_times.append(up_s + labctl("down", lab))
        finally:
            labctl_down(lab)
    ip_s, lc_s = statistics.median(ip_times), statistics.median(lc_times)
    ratio = lc_s / ip_s
    print(
        f"{label:<24} {ip_s:>9.3f}s {lc_s:>9.3f}s {ratio:>6.2f}x   (labctl up alone {statistics.median(lc_up):.3f}s)",
        flush=True,
    )
    return ratio


def converge_rows(file: Path, lab: str, n: int, runs: int) -> None:
    try:
        labctl("up", str(file))
        again = statistics.median(labctl("up", str(file)) for _ in range(runs))
        human = statistics.median(labctl("status", lab) for _ in range(runs))
        as_json = statistics.median(labctl("status", lab, "--json") for _ in range(runs))
    finally:
        labctl_down(lab)
    print(f"{f'second up, star {n}':<24} {'':>10} {again:>9.3f}s   goal <= 1.5 s {cpu('up')}", flush=True)
    print(f"{f'status, star {n}':<24} {'':>10} {human:>9.3f}s   goal <= 0.3 s {cpu('status', lab)}", flush=True)
    json_cpu = cpu("status", lab, "--json")
    print(f"{f'status --json, star {n}':<24} {'':>10} {as_json:>9.3f}s   goal <= 0.3 s {json_cpu}", flush=True)


SMALL = """name: bnsmall
topology:
  nodes:
    client:
      interfaces:
        eth0: {addresses: [10.98.0.1/24]}
    server:
      interfaces:
        eth0: {addresses: [10.98.0.2/24]}
  links:
    - endpoints: ["client:eth0", "server:eth0"]
"""
TRACED = "IP(dst='10.98.0.2')/UDP(dport=9)"


FLOORS = {
    "validate": "import typer, yaml\nfrom pydantic import BaseModel",
    "trace": (
        "import typer, yaml, rich.console\nfrom pydantic import BaseModel\nfrom scapy.config import conf\n"
        "conf.route_autoload = conf.route6_autoload = False\nimport scapy.layers.l2, scapy.layers.inet"
    ),
}
"""What a command cannot do without, imported and nothing else: the libraries labctl is built on (Typer,
PyYAML, pydantic; Rich and Scapy's Ethernet/IPv4 layers for a trace).  Printed beside the row as its floor."""


def floor(what: str, runs: int) -> tuple[float, float]:
    """(wall, CPU) medians of a new interpreter importing FLOORS[what]."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(timed(lambda: subprocess.run([sys.executable, "-c", FLOORS[what]], check=True)))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def help_row(runs: int, small: Path) -> None:
    bare = statistics.median(
        timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)) for _ in range(runs)
    )
    help_s = statistics.median(labctl("--help") for _ in range(runs))
    valid_s = statistics.median(labctl("validate", str(small)) for _ in range(runs))
    floor_s, floor_cpu = floor("validate", runs)
    print(
        f"{'labctl --help':<24} {bare:>9.3f}s {help_s:>9.3f}s   goal <= 0.15 s (left: python -c pass) {cpu('--help')}",
        flush=True,
    )
    print(f"{'labctl validate small':<24} {'':>10} {valid_s:>9.3f}s   goal <= 0.15 s {cpu('validate')}", flush=True)
    print(f"{'  floor: typer+pydantic':<24} {'':>10} {floor_s:>9.3f}s   (cpu {floor_cpu:.3f}s) importing Typer, PyYAML"
          " and pydantic's BaseModel, nothing else", flush=True)


def trace_row(runs: int, small: Path) -> None:
    try:
        labctl("up", str(small))
        labctl("trace", "bnsmall", "client", TRACED)  # the neighbour resolved, as for a user's second trace
        one = statistics.median(labctl("trace", "bnsmall", "client", TRACED) for _ in range(runs))
    finally:
        labctl_down("bnsmall")
    used = f"(cpu {statistics.median(CPU[f'trace bnsmall client {TRACED}'][1:]):.3f}s)"
    floor_s, floor_cpu = floor("trace", runs)
    print(f"{'trace, one packet':<24} {'':>10} {one:>9.3f}s   goal <= 0.4 s {used}", flush=True)
    print(f"{'  floor: +scapy, rich':<24} {'':>10} {floor_s:>9.3f}s   (cpu {floor_cpu:.3f}s) the same, and Rich and"
          " Scapy's Ethernet/IPv4 layers", flush=True)


def _failed_checks(report: str) -> list[str]:
    """LAB:CHECK of each check of a ``run --json`` report that failed or erred (LAB: error for a lab)."""
    try:
        labs = json.loads(report)["labs"]
    except (ValueError, KeyError, TypeError):
        return ["(no JSON report)"]
    found = [f"{lab['lab']}: {lab['error'][:80]}" for lab in labs if lab.get("error")]
    found += [f"{lab['lab']}:{c['name']}" for lab in labs for c in lab["checks"] if c["status"] in ("fail", "error")]
    return found


def run_row(runs: int, folder: str, jobs_list: list[int]) -> None:
    """labctl run labs/ with each -j of ``jobs_list`` (1: serial), interleaved; the best -j is named.

    A run that did not pass is shown with its exit code (another user's run of the same fixed lab names
    makes a run refuse "up already").  CPU is the run's and its workers' (user + sys).
    """
    times: dict[int, list[float]] = {j: [] for j in jobs_list}
    codes: dict[int, list[int]] = {j: [] for j in jobs_list}
    cpu: dict[int, list[float]] = {j: [] for j in jobs_list}
    failed: dict[int, list[str]] = {j: [] for j in jobs_list}
    for _ in range(runs):
        for jobs in jobs_list:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            done = subprocess.run(
                [LABCTL, "run", "-j", str(jobs), "--json", folder], stdout=subprocess.PIPE, text=True, check=False
            )
            times[jobs].append(time.perf_counter() - t0)
            failed[jobs] += _failed_checks(done.stdout)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[jobs].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            codes[jobs].append(done.returncode)
    medians = {j: statistics.median(times[j]) for j in jobs_list}
    serial = medians.get(1)
    for jobs in jobs_list:
        label = "run labs/ (serial)" if jobs == 1 else f"run -j {jobs} labs/"
        faster = f"{serial / medians[jobs]:.2f}x faster; " if serial and jobs != 1 else ""
        print(
            f"{label:<24} {'':>10} {medians[jobs]:>9.3f}s   {faster}cpu {statistics.median(cpu[jobs]):.1f}s;"
            f" exit codes {codes[jobs]}",
            flush=True,
        )
    for jobs in jobs_list:
        if failed[jobs]:
            print(f"  -j {jobs}: not passed: {', '.join(failed[jobs])}", flush=True)
    passing = [j for j in jobs_list if not any(codes[j])] or jobs_list
    best = min(passing, key=lambda j: medians[j])
    verdict = "met" if medians[best] <= 12.0 else "not met"
    print(f"goal run labs/ <= 12 s with -j: {verdict} (best -j {best}: {medians[best]:.3f}s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200,1000", help="star sizes; the largest is also converged")
    parser.add_argument("--chain", type=int, default=200, help="routers in the chain (0: no chain row)")
    parser.add_argument("--runs", type=int, default=5, help="runs per row; the median is reported")
    parser.add_argument("--rows", default="star,chain,converge,help,trace,run", help="which rows to run")
    parser.add_argument("--labs", default=str(Path(__file__).resolve().parent.parent / "labs"), help="for the run row")
    parser.add_argument("--jobs", default="1,2,4,6", help="the run row's -j values (1: serial)")
    parser.add_argument(
        "--tag", default="bn", help="prefix of the star and chain labs' names (two benches at once: give each its own)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_cli needs root (it builds namespaces)", file=sys.stderr)
        return 2
    rows = set(args.rows.split(","))
    package = Path(__file__).resolve().parent.parent / "labctl"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True, stdout=subprocess.DEVNULL)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(
        f"labctl as commands vs ip -batch; {os.cpu_count()} cores (nproc), kernel {platform.release()}, "
        f"median of {args.runs}, load average {os.getloadavg()[0]:.1f} at the start"
    )
    print(f"{'row':<24} {'ip -batch':>10} {'labctl':>10} {'ratio':>7}")
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        for n in sizes if "star" in rows or "converge" in rows else []:
            lab = f"{args.tag}star{n}"
            file = Path(tmp, f"{lab}.yaml")
            file.write_text(star_yaml(lab, n))
            if "star" in rows:
                base = baseline_name(lab)
                ratios[f"star {n}"] = up_down_row(
                    f"up+down, star {n}", file, lab, lambda n=n, base=base: ip_star_up(base, n), args.runs
                )
            if "converge" in rows and n == max(sizes):
                converge_rows(file, lab, n, args.runs)
        if "chain" in rows and args.chain > 1:
            lab = f"{args.tag}chain{args.chain}"
            file = Path(tmp, f"{lab}.yaml")
            file.write_text(chain_yaml(lab, args.chain))
            base = baseline_name(lab)
            ratios[f"chain {args.chain}"] = up_down_row(
                f"up+down, chain {args.chain}", file, lab, lambda: ip_chain_up(base, args.chain), args.runs
            )
        small = Path(tmp, "bnsmall.yaml")
        small.write_text(SMALL)
        if "help" in rows:
            help_row(args.runs, small)
        if "trace" in rows:
            trace_row(args.runs, small)
    if "run" in rows:
        run_row(args.runs, args.labs, [int(j) for j in args.jobs.split(",")])
    for what, ratio in ratios.items():
        print(f"goal up+down <= 1.0x ip -batch, {what}: {'met' if ratio <= 1.0 else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
