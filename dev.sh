#!/usr/bin/env bash
# The project's set-up and entry points, for a fresh clone with only Python 3.11+:
#   ./dev.sh demo    the main job (starts local Tansu + Valkey itself)
#   ./dev.sh test    the test suite (starts its own servers on free ports)
#   ./dev.sh bench   the benchmarks under bench/
# The first run creates .venv and installs everything; later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    "$PYTHON" -m venv .venv
    # torch first, pinned: the project's torch range is then already met and
    # pip does not pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch .venv/.installed
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) exec .venv/bin/stream-learner demo "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    bench)
        for b in bench/bench_*.py; do .venv/bin/python "$b" "$@"; done ;;
    *) echo "usage: ./dev.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
