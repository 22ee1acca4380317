#!/usr/bin/env bash
# One entry point for a fresh machine: installs what the project needs, then runs it.
#   ./dev.sh demo          self-contained demo merge on a tiny built-in model
#   ./dev.sh test [ARGS]   the whole test suite: core, then the WebUI tab in a gradio 3.41.2
#                          venv and a gradio 4.40.0 (Forge) venv (extra ARGS go to pytest)
#   ./dev.sh bench         solver benchmark (python -m bench.solver), then the pipeline one
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install() {
    # torch first and pinned: an unpinned resolve would pull the newest build and its
    # multi-GB CUDA stack even on a CPU-only machine. An installed torch is kept as is.
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -e ".[$1]"
}

case "${1:-}" in
    demo)
        install standalone
        "$PY" -m loraclr_ext demo
        ;;
    test)
        install test
        shift
        "$PY" -m ruff check .
        "$PY" -m ruff format --check .
        "$PY" -m pytest "$@"
        # The WebUI tab under gradio 3.41.2 and 4.40.0 (numpy 1.x), each in its own venv.
        PYTHON="$PY" .ci/run-ui "$@"
        ;;
    bench)
        install standalone
        "$PY" -m bench.solver
        "$PY" -m bench.pipeline
        ;;
    *)
        echo "usage: ./dev.sh demo | test [pytest args] | bench" >&2
        exit 2
        ;;
esac
