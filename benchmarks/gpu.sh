#!/usr/bin/env bash
# The GPU session's one command: GPU tests, then GPU benchmarks; results in the folder named.
#   benchmarks/gpu.sh [--dry-run] RESULTS_DIR [--budget-s S] [--work-dir DIR] [--skip-tests]
# On the lent GPU machine nothing can be downloaded: the packages its Python lacks travel as wheels
# in .whl/ (benchmarks/gpu_wheels.sh fills it; benchmarks/README.md says how to carry it) and are
# installed here into a private folder, never into that machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
# Only an interpreter that lacks sdft's dependencies gets the wheels (the GPU machine's; a dev venv has them).
if ! "$python" -c "import diffusers, peft, pydantic_settings, structlog" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  site=${SDFT_GPU_SITE:-${TMPDIR:-/tmp}/sdft-gpu-site}
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu.py "$@"
