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

# One list of Debian packages for this machine and for the VM image (labctl/vm/image.py reads it too).
mapfile -t DEBS < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' debian-packages.txt)
# python-iptables is published as source only: its small C extension (libxtwrapper, no Python.h)
# needs a C compiler and libc headers, installed only when the machine has no working compiler.
BUILD_DEBS=(gcc libc6-dev)
LOG=${TMPDIR:-/tmp}/labctl-setup.log

die() { echo "setup.sh: $*" >&2; exit 1; }
say() { echo "setup.sh: $*"; }

# Run a noisy step with its output in $LOG; on failure show the end of it (a clean run prints nothing).
quietly() {
    if ! "$@" >>"$LOG" 2>&1; then
        echo "setup.sh: failed: $*" >&2
        tail -n 40 "$LOG" | grep -v '^WARNING: Location' >&2
        die "full log: $LOG"
    fi
}

[ "$(id -u)" = 0 ] || die "run as root: labctl builds namespaces, links and netfilter rules"

apt_updated=0
apt_install() {
    if [ $apt_updated = 0 ]; then
        quietly apt-get update -qq
        apt_updated=1
    fi
    quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

missing_debs() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

install_debs() {
    local missing
    mapfile -t missing < <(missing_debs "${DEBS[@]}")
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${#missing[@]} Debian packages: ${missing[*]}"
        apt_install "${missing[@]}"
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

# True when the compiler this Python builds extensions with exists and can build a C file.
can_compile() {
    local py=$1 cc tmp ok=1
    cc=$("$py" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')
    command -v "$cc" >/dev/null || return 1
    tmp=$(mktemp -d)
    printf '#include <stdio.h>\n#include <setjmp.h>\nint main(void) { return 0; }\n' >"$tmp/t.c"
    "$cc" -c "$tmp/t.c" -o "$tmp/t.o" >/dev/null 2>&1 && ok=0
    rm -rf "$tmp"
    return $ok
}

install_venv() {
    local stamp=.venv/.labctl-installed want py
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -x .venv/bin/labctl ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    py=$(python_bin)
    if ! can_compile "$py"; then
        local missing
        mapfile -t missing < <(missing_debs "${BUILD_DEBS[@]}")
        if [ ${#missing[@]} -gt 0 ]; then
            say "installing a C compiler for python-iptables' extension: ${missing[*]}"
            apt_install "${missing[@]}"
        fi
        can_compile "$py" || die "no working C compiler for python-iptables ($("$py" -c 'import sysconfig; print(sysconfig.get_config_var("CC"))'))"
    fi
    say "creating .venv with labctl and its Python packages ($("$py" --version))"
    quietly "$py" -m venv .venv
    quietly .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    quietly .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
    # the setuptools that Python 3.11's venv brings is nobody's dependency (pip builds in an isolated env),
    # but its distutils shim makes python-iptables' "import distutils" load setuptools and pkg_resources:
    # 0.23 s of every command that touches iptables
    quietly .venv/bin/pip uninstall -q -y --disable-pip-version-check setuptools
    echo "$want" > "$stamp"
    say "installed $(.venv/bin/labctl --version)"
}

install_all() {
    : >"$LOG"
    install_debs
    install_venv
    # byte-compile the editable checkout (pip compiles installed packages, not this one): with
    # PYTHONDONTWRITEBYTECODE set, every labctl command would otherwise compile its modules again
    .venv/bin/python -m compileall -q labctl >/dev/null 2>&1 || true
    # tracefs is where the kernel path observer reads tracepoints
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
}

cmd=${1:-demo}
shift || true
case "$cmd" in
    install)
        install_all
        say "ready: .venv/bin/labctl (source .venv/bin/activate puts it on PATH)"
        ;;
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
