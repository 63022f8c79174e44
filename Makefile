# The README's two commands: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: install demo test test-all clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: that release's CPU wheel lies on disk here, while a bare `torch`
# requirement would pull a multi-GB CUDA build. pyproject.toml only declares torch>=2.2.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RNMT="$(VENV)/bin/rnmt" PYTHON="$(PY)" bash data/demo.sh $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
