#!/usr/bin/env bash
# The one-GPU check of omni-ds: GPU-only tests, omni_8x84m bf16 training steps (MFU, omni vs
# Switch), the MoE layer's kernels at 16k/64k tokens, and a dense/Switch/omni fidelity run; one
# table, a JSON summary, exit 1 if a part failed; within 8 minutes on one H200, set-up included.
#
#   bash benchmarks/gpu_wheels.sh                      # once, where pip reaches PyPI
#   bash benchmarks/gpu_check.sh --out DIR             # on the GPU machine (no registry needed)
#   bash benchmarks/gpu_check.sh --cpu-smoke --out DIR # every part at toy sizes on the CPU
#
# On the GPU it runs the machine's own python3 and CUDA torch; what the image lacks (DeepSpeed,
# pydantic, webdataset, soundfile, soxr, jiwer and their needs) is installed from the wheels in
# .gpu-wheels/ (or $GPU_WHEELS) with --no-index into a private target directory. The smoke runs
# $PYTHON (default .venv/bin/python) with what it has.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "$smoke" = 1 ]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    PYTHON=${PYTHON:-python3}
    wheels=${GPU_WHEELS:-.gpu-wheels}
    site=${GPU_SITE:-/tmp/omni-ds-site}
    if ! ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
        echo "gpu_check: no wheels in $wheels: run bash benchmarks/gpu_wheels.sh here first" >&2
        exit 2
    fi
    start=$(date +%s)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    export DS_ACCELERATOR=cuda
    # The check must run on the machine's torch: a wheel that brought its own would be a bug.
    if [ -d "$site/torch" ]; then echo "gpu_check: a wheel installed torch into $site" >&2; exit 2; fi
    "$PYTHON" -c "import torch, deepspeed, pydantic, webdataset, soundfile, soxr, jiwer; \
print(f'gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, '
      f'{torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\"}')"
    echo "gpu_check: set-up $(( $(date +%s) - start )) s"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
