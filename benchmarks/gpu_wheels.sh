#!/usr/bin/env bash
# Fills .whl/ with the wheels benchmarks/gpu.sh installs on a lent GPU machine, which reaches no
# package index. That machine has its own Python 3.12 with CUDA torch, transformers, accelerate,
# safetensors, Pillow, numpy, pytest; these are what sdft needs beyond them, at this project's pins
# (requirements.lock; bitsandbytes as in docker/requirements.lock). boto3 stays behind (17 MB of the
# 64 MiB a call may carry): the GPU runs use local folders. Run here, with network, once:
#   benchmarks/gpu_wheels.sh          (then carry .whl: see benchmarks/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
wheels=(
  diffusers==0.42.1 peft==0.21.2 structlog==26.1.0
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
  typing-inspection==0.4.5 typing_extensions==4.16.0 python-dotenv==1.2.4
  importlib_metadata==10.2.0 zipp==4.1.2
  bitsandbytes==0.50.2
  pillow_heif==1.8.1
)
mkdir -p .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d .whl "${wheels[@]}"
du -sh .whl
