#!/usr/bin/env python3
"""Build and remove a star of N hosts on one bridge: labctl vs an ``ip -batch`` script.

Both do the same kernel work: a switch namespace with br0, N host namespaces,
one veth per host (peer born in the host namespace, enslaved to br0), lo and
eth0 up, one address per host.  labctl additionally turns IPv6 off in every
namespace (two sysctl writes each), which the baseline does not.

``ip -batch`` cannot switch namespace per line, so the baseline is one batch in
the root namespace (netns add), one in the switch (bridge + veths) and one
``ip -n hostN -batch`` per host for its address and links: the fastest way to
do it with iproute2.

    python bench/bench_build.py [--sizes 50,200,1000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from labctl.kernel import netns
from labctl.lab import build
from labctl.topology.model import Topology


def star(name: str, n: int) -> Topology:
    nodes: dict[str, object] = {
        "sw": {"bridges": {"br0": {"ports": [f"p{i}" for i in range(n)]}}},
    }
    for i in range(n):
        nodes[f"h{i}"] = {"interfaces": {"eth0": {"addresses": [address(i)]}}}
    links = [{"endpoints": [f"h{i}:eth0", f"sw:p{i}"]} for i in range(n)]
    return Topology.model_validate({"name": name, "topology": {"nodes": nodes, "links": links}})


def address(i: int) -> str:
    return f"10.{100 + i // 65000}.{(i // 250) % 250}.{i % 250 + 1}/8"


def labctl_build(n: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    topo = star("bench-star", n)
    t1 = time.perf_counter()
    build.up(topo, "bench")
    t2 = time.perf_counter()
    build.down("bench-star")
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def ip_batch(argv: list[str], lines: list[str]) -> None:
    subprocess.run(["ip", *argv, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)


def iproute2_build(n: int) -> tuple[float, float]:
    lab = "bench-ip"
    sw = netns.namespace_name(lab, "sw")
    hosts = [netns.namespace_name(lab, f"h{i}") for i in range(n)]
    t0 = time.perf_counter()
    ip_batch([], [f"netns add {sw}"] + [f"netns add {h}" for h in hosts])
    switch = ["link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"]
    for i, h in enumerate(hosts):
        switch += [f"link add p{i} type veth peer name eth0 netns {h}", f"link set p{i} master br0 up"]
    ip_batch(["-n", sw], switch)
    for i, h in enumerate(hosts):
        ip_batch(["-n", h], ["link set lo up", "link set eth0 up", f"addr add {address(i)} dev eth0"])
    t1 = time.perf_counter()
    ip_batch([], [f"netns del {h}" for h in [sw, *hosts]])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,200,1000")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the best is reported")
    args = parser.parse_args()
    print(
        f"{'N':>6} {'ip -batch up':>13} {'labctl up':>10} {'ratio':>6} {'(model)':>8} "
        f"{'ip down':>8} {'labctl down':>11} {'ms/host labctl':>15}"
    )
    worst = 0.0
    for n in (int(s) for s in args.sizes.split(",")):
        ip_up = ip_down = lc_up = lc_down = lc_model = float("inf")
        for _ in range(args.repeat):
            up_s, down_s = iproute2_build(n)
            ip_up, ip_down = min(ip_up, up_s), min(ip_down, down_s)
            model_s, b_s, d_s = labctl_build(n)
            lc_model, lc_up, lc_down = min(lc_model, model_s), min(lc_up, b_s), min(lc_down, d_s)
        ratio = lc_up / ip_up
        worst = max(worst, ratio if n == 200 else 0)
        print(
            f"{n:>6} {ip_up:>12.3f}s {lc_up:>9.3f}s {ratio:>5.2f}x {lc_model:>7.3f}s "
            f"{ip_down:>7.3f}s {lc_down:>10.3f}s {1000 * lc_up / n:>14.2f}"
        )
    if worst:
        print(f"goal: labctl <= 1.3x ip -batch at N=200: {'met' if worst <= 1.3 else 'NOT met'} ({worst:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
