#!/usr/bin/env bash
# The project's set-up and entry points, for a fresh clone with only Python 3.11+:
#   ./dev.sh demo    the main job (starts local Tansu + Valkey itself)
#   ./dev.sh test    lint, format and type checks, then the test suite (it
#                    starts its own servers on free ports); arguments go to pytest
#   ./dev.sh check   the lint, format and type checks alone
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

checks() {
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) exec .venv/bin/stream-learner demo "$@" ;;
    check) checks ;;
    test) checks && exec .venv/bin/python -m pytest "$@" ;;
    bench)
        for b in bench/bench_*.py; do .venv/bin/python "$b" "$@"; done ;;
    *) echo "usage: ./dev.sh demo|test|check|bench [args]" >&2; exit 2 ;;
esac
