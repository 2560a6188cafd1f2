# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are pinned as a working pair (the video processor needs torchvision);
# override TORCH_PACKAGES for another platform, e.g. TORCH_PACKAGES="torch torchvision".
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-data

.PHONY: demo test install install-dev browser postgres lint clean gpu-wheels

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

test: install-dev browser postgres
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
