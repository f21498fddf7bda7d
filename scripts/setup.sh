#!/usr/bin/env bash
# Sets up a fresh Debian machine for sockrepair, idempotently: the system tools it drives, a venv with the package
# and its test/bench dependencies, and a criu that works on this kernel (`sockrepair criu setup`: a working one is
# kept, else Debian's criu >= 4.2 goes to /var/lib/sockrepair/criu). Needs root (apt-get, TCP_REPAIR, criu).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v iptables >/dev/null || missing+=(iptables)
command -v cc >/dev/null || missing+=(gcc libc6-dev)
dpkg-query -W -f='${Status}' libnftables1 2>/dev/null | grep -q "ok installed" || missing+=(libnftables1)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'

.venv/bin/sockrepair criu setup
echo "setup: done"
