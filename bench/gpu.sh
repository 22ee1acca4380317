#!/usr/bin/env bash
# The whole GPU benchmark table of bench/README.md in one run (issue 13): SD 1.5 with 2, 4
# and 12 LoRAs (+ a LoCon row, + steps and size doubled), SDXL with 4 LoRAs (+ doubled), and
# the layer solver against the released recipe. About 5 minutes on one data-centre GPU.
#
#   bench/gpu.sh [PYTHON]      PYTHON: one with torch (CUDA), diffusers and transformers
#
# On a machine that cannot install packages, put the wheels this package needs in .whl/
# (diffusers is pure Python); they are installed to /tmp/site first. Output is also written
# to $OUT/gpu-table.txt when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log=${OUT:+$OUT/gpu-table.txt}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
    echo "## SD 1.5"
    "$py" -m bench.pipeline --device cuda --arch sd1 --concepts 2 4 12 --locon --double
    echo "## SDXL"
    "$py" -m bench.pipeline --device cuda --arch sdxl --concepts 4 --double
    echo "## layer solver (synthetic SD 1.5 shapes)"
    "$py" -m bench.solver --device cuda --quick
} 2>&1 | tee "${log:-/dev/null}"
