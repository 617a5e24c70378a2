#!/usr/bin/env bash
# One entry point for a new machine: sets everything up, then runs the demo or the tests.
#   bash dev.sh demo [ARGS...]   throwaway PKI, CA, two gateways, two services; shows allow/deny
#   bash dev.sh test [PYTEST ARGS...]   system packages, virtualenv, the whole test suite
#   bash dev.sh bench [ARGS...]  benchmarks against a direct connection and stunnel
set -euo pipefail
cd "$(dirname "$0")"
VENV=${S2SGW_VENV:-.venv}

need_packages() {
    # Debian packages the tests and benchmarks call as real peers.
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        # Install servers (nginx, haproxy, postgresql, ...) as programs only: tests and benchmarks start their
        # own instances on loopback ports, so keep the packages from starting system daemons.
        local guard=/usr/sbin/policy-rc.d
        local placed=""
        if [ ! -e "$guard" ]; then
            printf '#!/bin/sh\nexit 101\n' | $sudo tee "$guard" >/dev/null
            $sudo chmod +x "$guard"
            placed=1
        fi
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
        [ -z "$placed" ] || $sudo rm -f "$guard"
    fi
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.s2sgw-installed"
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
        echo "setting up $VENV (log: $VENV/install.log)"
        # compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/.
        if ! { "$VENV/bin/pip" install -q --upgrade pip &&
               "$VENV/bin/pip" install -q -e '.[test]' --config-settings editable_mode=compat; } \
               >"$VENV/install.log" 2>&1; then
            cat "$VENV/install.log" >&2
            exit 1
        fi
        touch "$stamp"
    fi
    export PATH="$PWD/$VENV/bin:$PATH"
}

cmd=${1:-test}
shift || true
case "$cmd" in
    demo)
        need_packages openssl
        setup_venv
        exec s2sgw demo "$@"
        ;;
    test)
        need_packages openssl curl nginx libnginx-mod-stream wrk postgresql
        setup_venv
        exec python -m pytest -q "$@"
        ;;
    bench)
        # Also HAProxy and nginx; nginx's stream module is its own package on Debian (libnginx-mod-stream).
        need_packages openssl stunnel4 wrk iperf3 haproxy nginx libnginx-mod-stream postgresql
        setup_venv
        exec python -m bench "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo|test|bench [ARGS...]" >&2
        exit 2
        ;;
esac
