# The two set-up commands of the README. Each creates .venv when missing and installs
# what it needs, so on a fresh clone `make demo` or `make test` is the whole set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ifeq ($(OS),Windows_NT)
PY := $(VENV)/Scripts/python.exe
endif
STAMP := $(VENV)/.tiktrue-installed

.PHONY: demo test lint format bench clean browser prometheus screenshots

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: 2.13.0 is the CPU build on the project's machines.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tiktrue demo

test: $(STAMP) browser prometheus
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

# The browser tests drive Debian's chromium (Playwright cannot download its own offline).
# Installed here when missing and we may (root or sudo); else those tests skip, saying why.
browser:
	@test -x /usr/bin/chromium || command -v apt-get >/dev/null 2>&1 || exit 0; \
	if test -x /usr/bin/chromium; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "no chromium and no root: the browser tests will skip"; exit 0; fi; \
	$$SUDO apt-get update -qq >/dev/null && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
	echo "could not install chromium: the browser tests will skip"

# The metrics tests check /metrics with promtool and scrape real nodes with a real Prometheus
# (Debian's prometheus package); installed the same way when missing, else those tests skip.
prometheus:
	@test -x /usr/bin/promtool || command -v apt-get >/dev/null 2>&1 || exit 0; \
	if test -x /usr/bin/promtool; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "no prometheus and no root: the Prometheus tests will skip"; exit 0; fi; \
	$$SUDO apt-get update -qq >/dev/null && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null || echo "could not install prometheus: its tests will skip"

# The README's screenshots, with the demo's real model answering (downloads it once, 93 MB).
screenshots: $(STAMP) browser
	$(PY) bench/screenshots.py

lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

format: $(STAMP)
	$(PY) -m ruff format src tests bench
	$(PY) -m ruff check --fix src tests bench

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/span_memory.py
	$(PY) bench/pipeline.py
	$(PY) bench/network.py

clean:
	rm -rf $(VENV) build dist *.egg-info
