#!/usr/bin/env bash
# One entry point for a fresh machine. Works with no virtual environment active: it makes
# and uses its own (.venv, and .venv310 for the Python 3.10 run), so a stock Debian/Ubuntu
# system Python is never touched.
#
#   ./dev.sh demo          the demo merge on a tiny model built offline (files kept in ./loraclr-demo)
#   ./dev.sh test [ARGS]   everything CI runs: lint, type check, fast tier, slow tier, the fast
#                          tier again on Python 3.10, then the WebUI tests under gradio 3.41.2
#                          and 4.40.0 (extra ARGS go to every pytest run)
#   ./dev.sh fast [ARGS]   lint, type check and the fast tier only (a few minutes)
#   ./dev.sh toyworld      the toy world's identity tests (trains it first: ~20 CPU minutes;
#                          LORACLR_TOYWORLD_CACHE=DIR reuses a built one)
#   ./dev.sh bench         solver benchmark, then the whole-pipeline one
#
# Environment: PYTHON (default python3), PYTHON310 (a Python 3.10; found under pyenv or on
# PATH when unset), TORCH_INDEX_URL (a wheel index for torch, e.g. PyTorch's CPU-only index,
# to skip the CUDA build the default index serves on Linux).
set -euo pipefail
cd "$(dirname "$0")"
TORCH="torch==2.13.0"

make_venv() {  # make_venv DIR PYTHON -> prints the venv's python
    local dir=$1 base=$2
    if [ ! -x "$dir/bin/python" ]; then
        if ! "$base" -m venv "$dir" >/dev/null 2>&1; then
            rm -rf "$dir"
            echo "dev.sh: '$base -m venv' failed; install the venv module first" \
                "(Debian/Ubuntu: sudo apt install python3-venv)" >&2
            exit 1
        fi
        "$dir/bin/python" -m pip install -q --upgrade pip >&2
    fi
    echo "$dir/bin/python"
}

python_env() {  # the interpreter to use: the active venv's, else ./.venv's
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        echo "${PYTHON:-python}"
    else
        make_venv .venv "${PYTHON:-python3}"
    fi
}

install() {  # install PY EXTRA
    local py=$1 extra=$2
    # torch first: an installed torch is kept; otherwise the pinned version (the default
    # Linux wheel is the CUDA build, several GB; TORCH_INDEX_URL picks another index).
    if ! "$py" -c "import torch" 2>/dev/null; then
        echo "dev.sh: installing $TORCH into $("$py" -c 'import sys; print(sys.prefix)')" >&2
        "$py" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH"
    fi
    "$py" -m pip install -q -e ".[$extra]"
}

find_python310() {
    if [ -n "${PYTHON310:-}" ]; then echo "$PYTHON310"; return; fi
    local root found
    root=$( (command -v pyenv >/dev/null 2>&1 && pyenv root) || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    found=$(ls -d "$root"/versions/3.10*/bin/python3.10 2>/dev/null | tail -n 1)
    if [ -n "$found" ]; then echo "$found"; return; fi
    if command -v python3.10 >/dev/null 2>&1 && python3.10 -c "" 2>/dev/null; then
        command -v python3.10
    fi
}

checks() {  # lint and type check
    local py=$1
    "$py" -m ruff check .
    "$py" -m ruff format --check .
    "$py" -m mypy
}

timed() {  # timed LABEL COMMAND... : run, then print the label and wall time
    local label=$1 started=$SECONDS
    shift
    "$@"
    echo "== $label: $((SECONDS - started)) s"
}

case "${1:-}" in
    demo)
        shift
        PY=$(python_env)
        install "$PY" standalone
        "$PY" -m loraclr_ext demo "$@"
        ;;
    fast)
        shift
        PY=$(python_env)
        install "$PY" test
        checks "$PY"
        timed "fast tier" "$PY" -m pytest -m "not slow" "$@"
        ;;
    test)
        shift
        PY=$(python_env)
        install "$PY" test
        checks "$PY"
        timed "fast tier" "$PY" -m pytest -m "not slow" "$@"
        timed "slow tier" "$PY" -m pytest -m "slow and not toyworld" "$@"
        PY310=$(find_python310)
        if [ -n "$PY310" ]; then
            VENV310=$(make_venv .venv310 "$PY310")
            install "$VENV310" test
            timed "fast tier on Python 3.10" "$VENV310" -m pytest -m "not slow" -p no:cacheprovider "$@"
        elif [ "${CI:-}" = "true" ]; then
            echo "dev.sh: no Python 3.10 found; CI must run the Python 3.10 tier" >&2
            exit 1
        else
            echo "dev.sh: no Python 3.10 found (set PYTHON310); its tier was not run" >&2
        fi
        # The WebUI tab under gradio 3.41.2 and 4.40.0 (numpy 1.x), each in its own venv.
        PYTHON="${PYTHON:-python3}" timed "WebUI tier" .ci/run-ui "$@"
        ;;
    toyworld)
        shift
        PY=$(python_env)
        install "$PY" test
        timed "toy world" "$PY" -m pytest -m toyworld "$@"
        ;;
    bench)
        PY=$(python_env)
        install "$PY" standalone
        "$PY" -m bench.solver
        "$PY" -m bench.pipeline
        ;;
    *)
        echo "usage: ./dev.sh demo | test [pytest args] | fast [pytest args] | toyworld | bench" >&2
        exit 2
        ;;
esac
