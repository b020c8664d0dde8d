# The two set-up commands of the README. Each creates .venv when missing and installs
# what it needs, so on a fresh clone `make demo` or `make test` is the whole set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ifeq ($(OS),Windows_NT)
PY := $(VENV)/Scripts/python.exe
endif
STAMP := $(VENV)/.tiktrue-installed

.PHONY: demo test lint format bench clean browser prometheus systemd-container screenshots bundle \
	bundle-test i18n

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: 2.13.0 is the CPU build on the project's machines.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tiktrue demo

test: $(STAMP) browser prometheus systemd-container
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

# The service's test boots this PC's OS tree under a real systemd with systemd-nspawn (Debian's
# systemd-container); installed the same way when missing. The test needs root: without it, or
# where nspawn cannot boot (an unprivileged CI container), it skips, saying why.
systemd-container:
	@test -x /usr/bin/systemd-nspawn || command -v apt-get >/dev/null 2>&1 || exit 0; \
	if test -x /usr/bin/systemd-nspawn || [ "$$(id -u)" != 0 ]; then exit 0; fi; \
	apt-get update -qq >/dev/null && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		systemd-container >/dev/null || echo "could not install systemd-container: its test will skip"

# The README's screenshots, with the demo's real model answering (downloads it once, 93 MB).
screenshots: $(STAMP) browser
	$(PY) bench/screenshots.py

# The UI's translations (README, "Languages"): the texts marked in src/tiktrue/ui are
# extracted, every catalog is brought up to date with them (a new text comes in empty, for the
# translator), and compiled for gettext. The .po and the .mo files are both committed.
LOCALES := src/tiktrue/ui/locales
BABEL := $(PY) -m babel.messages.frontend
i18n: $(STAMP)
	@mkdir -p build
	$(BABEL) extract --keyword "N_ Nn_:1,2" --add-location file --sort-output \
		--add-comments "TRANSLATORS:" --project TikTrue --no-wrap -o build/tiktrue.pot src/tiktrue/ui
	$(BABEL) update --domain tiktrue --input-file build/tiktrue.pot --output-dir $(LOCALES) \
		--ignore-obsolete --ignore-pot-creation-date --no-wrap
	$(BABEL) compile --domain tiktrue --directory $(LOCALES) --statistics

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

# The PyInstaller bundle, one folder: dist/tiktrue/ with `tiktrue`, `service_runner` (the node)
# and `main_app` (the app), and the CPU build of torch (the spec refuses a CUDA one). Minutes.
# OBFUSCATE=1: the tiktrue package obfuscated with PyArmor first (deploy/pyinstaller/obfuscate.sh).
BUNDLE := dist/tiktrue
bundle: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bundle]"
	rm -rf build/obfuscated
	@if [ "$(OBFUSCATE)" = 1 ]; then PY=$(PY) sh deploy/pyinstaller/obfuscate.sh build/obfuscated; fi
	TIKTRUE_BUNDLE_SRC=$(if $(filter 1,$(OBFUSCATE)),build/obfuscated,src) $(PY) -m PyInstaller \
		--noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller \
		deploy/pyinstaller/tiktrue.spec
	@du -sh $(BUNDLE)
	$(BUNDLE)/tiktrue --version

# The bundle's own executables (what dist/tiktrue holds; built first when absent): commands and
# help, import the demo model, run a node, answer a chat, the UI in Persian in chromium, the
# bundle as a systemd service (root: a container). Not in `make test`: the build takes minutes.
$(BUNDLE)/tiktrue:
	$(MAKE) bundle

bundle-test: $(STAMP) browser systemd-container | $(BUNDLE)/tiktrue
	TIKTRUE_BUNDLE=$(BUNDLE) $(PY) -m pytest -q -p no:cacheprovider tests/bundle

clean:
	rm -rf $(VENV) build dist *.egg-info
