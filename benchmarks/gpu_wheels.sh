#!/usr/bin/env bash
# Gathers, here (where pip reaches PyPI), the wheels that benchmarks/gpu_check.sh installs on a
# GPU machine that reaches no package registry: every runtime dependency of omni-ds that the
# machine's image lacks, for CPython 3.12 on manylinux x86-64. Torch is never among them: the
# check runs on the machine's own CUDA torch.
#
#   bash benchmarks/gpu_wheels.sh            # into .gpu-wheels/ (git-ignored), prints the size
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh DIR
#
# DeepSpeed 0.19.8 is a source distribution: its wheel is built here with `pip wheel --no-deps`
# in an isolated build (no torch there, so no ops are compiled: they JIT on first use). The H200
# image already has einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm, click,
# pyyaml, sentencepiece, safetensors, tensorboard, matplotlib and pytest(-timeout); the list
# below is the rest, pinned to the versions CI tests with. typing-extensions travels too:
# pydantic 2.14 needs >= 4.16, newer than some images hold.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PYTHON=${PYTHON:-python3}
PINS=(
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 typing-extensions==4.16.0
    webdataset==1.0.2 braceexpand==0.1.7 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
    soxr==1.1.0 jiwer==4.0.0 rapidfuzz==3.14.6
)
PLATFORMS=()
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    "${PLATFORMS[@]}" --platform any -d "$DEST" "${PINS[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --no-cache-dir -w "$DEST" deepspeed==0.19.8
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne $((${#PINS[@]} + 1)) ]; then
    echo "gpu_wheels: expected $((${#PINS[@]} + 1)) wheels in $DEST, found $count" >&2
    exit 1
fi
ls -1 "$DEST"
echo "gpu_wheels: $count wheels, $(du -sk "$DEST" | cut -f1) KiB in $DEST (the device call carries at most 64 MiB with the tree)"
