# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean browser-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so nothing later can pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP) browser-deps
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m moonlet demo

# the chat-page browser test (tests/test_serve_browser.py) uses Debian's chromium through Playwright;
# best effort: without root/apt the test skips with a message. Never `playwright install` (system browser).
browser-deps: $(STAMP)
	-if [ ! -x /usr/bin/chromium ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; fi
	$(PY) -m pip install -q playwright

clean:
	rm -rf $(VENV) runs
