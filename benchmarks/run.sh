#!/usr/bin/env bash
# Bootstraps and runs the benchmark: `make bench` calls this. Builds benchmarks/.venv-bench from
# requirements.txt (exact pins; aiodcp itself is imported from this checkout's src/ by the
# workers), installs s3rver from package.json/package-lock.json into node_modules (Node >= 18
# must be on the machine) and nginx (Debian's nginx-light, when missing and we are root), then
# runs bench.py with the arguments given.
#   BENCH_QUICK=1 make bench                 # a few minutes
#   make bench BENCH_ARGS="--scenarios partial --repeats 5"
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV=.venv-bench
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ requirements.txt -nt "$STAMP" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -r requirements.txt
    touch "$STAMP"
fi
if [ ! -x node_modules/.bin/s3rver ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    command -v npm >/dev/null || { echo "npm (Node >= 18) is needed for s3rver" >&2; exit 1; }
    npm ci --no-audit --no-fund --loglevel=error
fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
        # The package may start its default site: the benchmark runs its own instance.
        /usr/sbin/nginx -s quit 2>/dev/null || true
    else
        echo "nginx is missing (apt-get install nginx-light), or run with --server s3rver" >&2
    fi
fi
if [ "${1:-}" = "save" ]; then  # `make bench-save`: the save benchmark (save.py)
    shift
    exec "$VENV/bin/python" save.py "$@"
fi
# BENCH_SCRIPT=headline.py (make headline) runs that script instead of bench.py.
exec "$VENV/bin/python" "${BENCH_SCRIPT:-bench.py}" "$@"
