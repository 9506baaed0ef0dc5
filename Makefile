# Every target creates and uses .venv/ in the repo root; nothing else is needed on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
IMAGE ?= sdft:local

.PHONY: help venv test-deps demo test test-fast test-real-shaped image test-image settings-table lock render-batch clean

help:
	@echo "make demo   - create the environment and run a real LoRA fine-tune on builtin:tiny (CPU, local files)"
	@echo "make test   - create the environment, install the test tools and run the whole suite"
	@echo "make test-fast - the fast tier only: no end-to-end training runs (slow), no CUDA-only checks (gpu)"
	@echo "make image  - build the container image $(IMAGE) with the local Docker engine (no registry needed)"
	@echo "make test-image - build the image, then run it with docker and check it from outside"

# The venv is rebuilt when the lock file changes. torch==2.13.0 is pinned so pip takes the CPU build
# from this machine's disk instead of downloading a multi-gigabyte CUDA build.
$(VENV)/.installed: requirements.lock requirements-data.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps --require-hashes -r requirements-data.lock
	$(PIP) install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

$(VENV)/.test-installed: $(VENV)/.installed $(VENV)/checkov/.installed requirements-test.txt
	$(PIP) install --quiet -r requirements-test.txt
	touch $@

# checkov's own pins (boto3, packaging, networkx) clash with requirements.lock: it gets its own venv.
$(VENV)/checkov/.installed: requirements-checkov.txt
	test -x $(VENV)/checkov/bin/python || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet -r requirements-checkov.txt
	touch $@

test-deps: $(VENV)/.test-installed

demo: venv
	rm -rf outputs/demo
	SDFT_BASE_MODEL=builtin:tiny \
	SDFT_INSTANCE_URI=examples/dog \
	SDFT_INSTANCE_PROMPT="a photo of sks dog" \
	SDFT_OUTPUT_URI=outputs/demo \
	SDFT_WORK_DIR=.work/demo \
	SDFT_RESOLUTION=64 \
	SDFT_MAX_TRAIN_STEPS=60 \
	SDFT_CHECKPOINT_EVERY_STEPS=20 \
	SDFT_NUM_VALIDATION_IMAGES=2 \
	SDFT_SAMPLE_INFERENCE_STEPS=10 \
	SDFT_RUN_ID=demo \
	$(PY) -m job
	@echo
	@echo "Results are in outputs/demo/ (weights in lora/, samples in samples/, run record in manifest.json)."

# The whole suite except the image tests (pyproject's addopts deselects the `image` marker).
test: test-deps
	$(PY) -m pytest -q

# Builds $(IMAGE): the pinned CUDA base when it can be pulled, else a local Debian bookworm base;
# dependencies from a wheelhouse filled here with hashes checked (scripts/build-image.sh; its
# downloads live in .work/image/ and are reused).
image: venv
	IMAGE=$(IMAGE) PYTHON=$(PY) scripts/build-image.sh

# The container tests (tests/test_image.py): docker run of the built image, checked from outside.
test-image: image test-deps
	SDFT_TEST_IMAGE=$(IMAGE) $(PY) -m pytest -q -m image tests/test_image.py

# In-process tests of settings, inputs, batching, keys, layout, storage, layering and infrastructure.
test-fast: test-deps
	$(PY) -m pytest -q -m "not slow and not gpu and not image"

# The single-file checkpoint tests on real-architecture SD 1.x / 2.x / SDXL files: ~13 min to build the
# cached files once (~14 GB under $$SDFT_TEST_CACHE), ~30 min of tests; left out of `make test` to keep CI short.
test-real-shaped: test-deps
	$(PY) -m pytest -q -m real_shaped

# Rewrites the README's settings table from the settings model (a test fails when they drift).
settings-table: venv
	$(PY) -c "import re, pathlib; from job.settings import settings_table; p = pathlib.Path('README.md'); \
	p.write_text(re.sub(r'(<!-- settings-table:start -->\n).*?(<!-- settings-table:end -->)', \
	lambda m: m.group(1) + settings_table() + '\n' + m.group(2), p.read_text(), flags=re.S))"

# Re-resolve requirements.lock from the direct dependencies in pyproject.toml.
lock: venv
	$(PIP) install --dry-run --ignore-installed --quiet --report .work/lock-report.json .
	$(PY) -c "import json; r = json.load(open('.work/lock-report.json')); \
	print('\n'.join(sorted(f\"{i['metadata']['name'].lower()}=={i['metadata']['version']}\" for i in r['install'] if i['metadata']['name'] != 'sdft')))"

# make render-batch BATCH=batch.jsonl BATCH_URI=s3://bucket/batches/batch.jsonl [OVERLAY=eks] [IMAGE=repo@sha256:…]
render-batch: test-deps
	@test -n "$(BATCH)" -a -n "$(BATCH_URI)" || { echo "usage: make render-batch BATCH=file.jsonl BATCH_URI=s3://…/file.jsonl [OVERLAY=eks] [IMAGE=repo@sha256:…]"; exit 2; }
	@IMAGE="$(IMAGE)" scripts/render-batch.sh "$(BATCH)" "$(BATCH_URI)" $(or $(OVERLAY),eks)

clean:
	rm -rf $(VENV) .work outputs
