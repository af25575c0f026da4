# OpenMarketSim. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DURATION ?= 60
SEED ?= 42
DEMO_ARGS ?=

.PHONY: demo test test-long lint bench clean

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit("OpenMarketSim needs Python 3.10+") if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py --duration $(DURATION) --seed $(SEED) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-long: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_gateway.py
	$(PY) bench/bench_feed.py
	$(PY) bench/bench_recovery.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
