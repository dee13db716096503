#!/usr/bin/env bash
# labctl set-up and entry point for a fresh Debian 12 / Ubuntu 24.04 machine, as root.
#
#   ./setup.sh demo    install what is missing, then run the demo labs
#   ./setup.sh test    install what is missing, then run the test suite
#   ./setup.sh install only install (Debian packages + .venv with labctl)
#
# Idempotent: Debian packages are installed only when missing, the virtualenv
# is rebuilt only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

DEBS=(python3 python3-venv python3-pip iproute2 iptables ebtables tcpdump ethtool netsniff-ng
      nftables graphviz iputils-ping conntrack libpcap0.8 kmod procps)

die() { echo "setup.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: labctl builds namespaces, links and netfilter rules"

install_debs() {
    local missing=()
    for pkg in "${DEBS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup.sh: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

python_bin() {
    # the newest python3 >= 3.11 on PATH (a pyenv or distro one)
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return
        fi
    done
    die "labctl needs Python 3.11 or newer"
}

install_venv() {
    local stamp=.venv/.labctl-installed want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -x .venv/bin/labctl ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    echo "setup.sh: creating .venv"
    "$(python_bin)" -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
}

install_all() {
    install_debs
    install_venv
    # tracefs is where the kernel path observer reads tracepoints
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
}

cmd=${1:-demo}
shift || true
case "$cmd" in
    install) install_all ;;
    demo)
        install_all
        exec .venv/bin/labctl demo "$@"
        ;;
    test)
        install_all
        set +e
        .venv/bin/python -m pytest "$@"
        rc=$?
        set -e
        .venv/bin/labctl clean >/dev/null 2>&1 || true
        exit $rc
        ;;
    *) die "unknown command '$cmd' (use demo, test or install)" ;;
esac
