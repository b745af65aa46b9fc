#!/usr/bin/env bash
# The accelerator check (bench/gpu_check.py) on a machine with one GPU: every figure into
# $1/gpu_check.json. Wheels left in .whl/ (bitsandbytes for the QLoRA peer, say) are
# installed into a private directory first. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu_check.sh OUT_DIR [gpu_check.py flags]}"
shift
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/qlora-spec-site .whl/*.whl
    export PYTHONPATH="/tmp/qlora-spec-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
python3 bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
