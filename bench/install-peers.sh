#!/usr/bin/env bash
# Installs the benchmark peers that are distribution packages, not PyPI packages: redis-server
# (bench/test_state.py, bench/test_scaling.py), nginx (bench/test_webcache.py), haproxy (the front
# tier of bench/test_hosts.py) and wrk (the load generator). Debian/Ubuntu (apt-get), as root. Idempotent: what is installed already is left
# alone. The Python peers (lmdb, redis-py, diskcache) come with `./dev bench` ([bench] extra).
set -euo pipefail

want=()
command -v redis-server >/dev/null || want+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || want+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || want+=(haproxy)
command -v wrk >/dev/null || want+=(wrk)

if [ ${#want[@]} -eq 0 ]; then
    echo "install-peers: redis-server, nginx, haproxy and wrk are already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-peers: missing ${want[*]}; run this script as root (sudo $0)," >&2
    echo "  or install them yourself: apt-get install ${want[*]}" >&2
    echo "  (the benchmarks skip the rows of a missing peer, and say so)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install-peers: no apt-get here; install ${want[*]} with your distribution's tools" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}"
# The benchmarks start their own servers (private unix socket, private port): the services the
# packages enable at boot are not needed by them.
echo "install-peers: installed ${want[*]}"
