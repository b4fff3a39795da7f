# `make demo` and `make test` set up .venv on first use (CPU-only torch wheel) and run.
# `make lint` runs ruff; `make plain-install-check` checks a no-extras install (.ci/run runs all).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
LINT   := mixbuild tests benchmarks scripts

.PHONY: demo test lint plain-install-check install clean fixture

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mixbuild demo

# Two workers, each test module whole on one (its module fixtures built once); exports both
# need are made once for the run (tests/conftest.py: shared_dir).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT)

# A fresh temporary venv: $(TORCH), `pip install .` with no extras, `mixbuild demo` (a few minutes).
plain-install-check:
	TORCH='$(TORCH)' bash scripts/ci/plain_install_check.sh

fixture: $(STAMP)
	$(PY) scripts/train_fixture.py --out mixbuild/fixtures/tiny-code

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
