#!/usr/bin/env bash
# Install the system programs the test-suite drives, when missing: curl, node/npm
# (ollama-js), redis-server, nginx, chromium and chromedriver (the status page's browser
# test). Debian/Ubuntu (apt-get); needs root or sudo. Each test starts its own instances
# on loopback; no system service is used.
set -euo pipefail

need=()
command -v curl >/dev/null || need+=(curl)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# `scripts/system-deps.sh bench`: also the load generator of the benchmarks.
if [ "${1:-}" = bench ]; then
  command -v wrk >/dev/null || need+=(wrk)
fi

if ((${#need[@]} == 0)); then
  exit 0
fi

sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then
    sudo="sudo"
  else
    echo "system-deps: need root (or sudo) to install: ${need[*]}" >&2
    exit 1
  fi
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
