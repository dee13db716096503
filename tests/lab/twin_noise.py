"""Noise for the twin test: a third copy of the twin lab making the same kinds of events, in a loop.

Closed-port drops on eth0, fdb learning (fresh source MACs) on br0's veth1,
and unanswered ARP for the very address the twins ask for -- all with the
twins' device names and addresses.  Bounded: it stops after SECONDS or when
its stdin closes.
"""

from __future__ import annotations

import random
import signal
import sys
import time

from labctl.kernel import netns
from labctl.kernel.inject import Injector
from labctl.kernel.neighwatch import flush_learned
from labctl.kernel.sockets import send_udp
from labctl.lab import build
from labctl.lab.labfile import load_lab


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)  # unwinds through ``finally``: the noise lab comes down


def main(file: str, name: str, seconds: float) -> None:
    signal.signal(signal.SIGTERM, _stop)
    lab, _ = load_lab(file)
    lab = lab.model_copy(update={"name": name})
    build.up(lab, file)
    c1 = netns.namespace_name(name, "c1")
    host = netns.namespace_name(name, "host")
    closed = bytes.fromhex("020000000802" "020000000801" "0800") + _udp(5999)
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    try:
        with Injector(c1, "eth0") as injector:
            while time.monotonic() < deadline:
                injector.send(closed, 20)
                mac = bytes([0x02, 0x00, 0x00, 0x00, 0x08, random.randint(0x10, 0xFE)])
                injector.send(bytes.fromhex("020000000802") + mac + bytes.fromhex("0800") + _udp(7), 1)
                send_udp(c1, "10.0.8.99", 6000, b"noise")
                flush_learned(host, "br0")
                time.sleep(0.02)
    finally:
        build.down(name)


def _udp(dport: int) -> bytes:
    from scapy.layers.inet import IP, UDP

    return bytes(IP(src="10.0.8.1", dst="10.0.8.2") / UDP(sport=40000, dport=dport) / b"noise")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
