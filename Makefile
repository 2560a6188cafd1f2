# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch and torchvision are pinned as a working pair (the video processor needs torchvision);
# override TORCH_PACKAGES for another platform, e.g. TORCH_PACKAGES="torch torchvision".
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo-data

.PHONY: demo test install install-dev browser lint clean

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
	@echo "Results are under ./omniq-data/results/<media-id>/: open index.html in a browser, or read manifest.json."

# The browser tests drive Debian's Chromium (no browser download works offline); installed when missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

test: install-dev browser
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check pipeline workers tests bench deploy

clean:
	rm -rf $(DEMO_DIR) omniq-data .pytest_cache
