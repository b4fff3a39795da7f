# `make demo` and `make test` set up .venv on first use (CPU-only torch wheel) and run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean fixture

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mixbuild demo

test: $(STAMP)
	$(PY) -m pytest -q

fixture: $(STAMP)
	$(PY) scripts/train_fixture.py --out mixbuild/fixtures/tiny-code

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
