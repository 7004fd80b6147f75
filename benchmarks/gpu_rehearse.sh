#!/usr/bin/env bash
# Rehearses, on a CPU machine where pip reaches PyPI, the software of the GPU machine that
# benchmarks/gpu_check.sh targets (CPython 3.12, CUDA torch 2.11 from PyPI, the newest numpy, no
# DeepSpeed): a venv with only what the image has, the .gpu-wheels/ installed exactly as
# gpu_check.sh installs them, then gpu_check.sh's set-up, its --cpu-smoke, the GPU tests on the
# CPU and the core tests of the GPU run. Not part of CI: the first run downloads ~4 GB (the CUDA
# torch wheel and its nvidia libraries; the CUDA build runs on the CPU).
#
#   PY312=/path/to/python3.12 bash benchmarks/gpu_rehearse.sh [DIR]   # DIR: .gpu-rehearse/
#   TORCH_WHEEL=torch-2.11.0-cp312-...whl ...                          # a torch wheel at hand
#   TESTS="tests/test_model.py" ...                                   # other core tests
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath -m "${1:-.gpu-rehearse}")
PY312=${PY312:-python3.12}
VENV=$DIR/venv SITE=$DIR/site
# What the H200 image holds that omni-ds needs (docs/benchmarks.md, GPU section), unpinned:
# the image tracks new releases, so the rehearsal does too.
IMAGE=(numpy sentencepiece safetensors tensorboard matplotlib tqdm pytest pytest-timeout pyyaml
       xxhash fsspec einops msgpack ninja packaging psutil py-cpuinfo click typing-extensions)
TESTS=${TESTS:-tests/test_expert_kernel.py tests/test_moe_dispatch.py tests/test_model.py
    tests/test_router.py tests/test_router_groups.py tests/test_expert_bias.py
    tests/test_moe_zero.py tests/test_engine.py tests/test_checkpoint.py tests/test_export.py
    tests/test_decode.py tests/test_wer.py tests/test_ds_json.py tests/test_config.py
    tests/test_loader.py tests/test_train.py tests/test_gpu_check.py}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${TORCH_WHEEL:-torch==2.11.0}" "${IMAGE[@]}"
fi
PY=$VENV/bin/python
"$PY" -c "import sys, torch, numpy; print(f'gpu_rehearse: Python {sys.version.split()[0]}, \
torch {torch.__version__}, numpy {numpy.__version__}')"
for absent in deepspeed pydantic hjson webdataset soundfile soxr jiwer; do
    if "$PY" -c "import $absent" 2>/dev/null; then
        echo "gpu_rehearse: $VENV has $absent, which the GPU image lacks: remove $DIR" >&2
        exit 2
    fi
done
ls .gpu-wheels/deepspeed-*.whl >/dev/null 2>&1 || bash benchmarks/gpu_wheels.sh
rm -rf "$SITE"
# gpu_check.sh's own set-up (install, torch guard, import line); without CUDA it then exits 2.
code=0
PYTHON=$PY GPU_SITE=$SITE bash benchmarks/gpu_check.sh --out "$DIR/gpu" || code=$?
if [ "$code" -ne 2 ]; then echo "gpu_rehearse: gpu_check.sh set-up: exit $code" >&2; exit 1; fi
PYTHON=$PY PYTHONPATH=$SITE bash benchmarks/gpu_check.sh --cpu-smoke --out "$DIR/smoke"
export PYTHONPATH=$PWD:$SITE
OMNI_DS_GPU_TEST_DEVICE=cpu DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES='' \
    "$PY" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q
# shellcheck disable=SC2086  # TESTS is a list of paths
"$PY" -m pytest -p no:cacheprovider -q $TESTS
echo "gpu_rehearse: all passed"
