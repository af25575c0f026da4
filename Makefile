# OpenMarketSim. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The matching core, compiled by mypyc from these same files (native_core.py); rebuilt
# when one changes. Without a C compiler everything runs on the pure-Python core.
CORE := models.py orderbook.py engine.py positions.py risk_manager.py margin_risk_manager.py
NATIVE := $(VENV)/.native
# Suites of the compiled modules (and the journal, which encodes their commands) that
# run a second time against the pure-Python core
CORE_TESTS := tests/test_models.py tests/test_orderbook.py tests/test_engine.py \
	tests/test_positions.py tests/test_risk.py tests/test_margin.py tests/test_properties.py \
	tests/test_journal.py tests/test_native_core.py
DURATION ?= 60
SEED ?= 42
DEMO_ARGS ?=

.PHONY: demo demo-lockstep test test-long lint bench native clean

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit("OpenMarketSim needs Python 3.10+") if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

# CI must not fall back silently: there a failed build is an error
$(NATIVE): $(STAMP) $(CORE) config.py native_core.py
	$(PY) native_core.py build $(if $(CI),--required,)
	@touch $(NATIVE)

native: $(NATIVE)

demo: $(NATIVE)
	$(PY) demo.py --duration $(DURATION) --seed $(SEED) $(DEMO_ARGS)

# The battle in simulated time (lockstep): same DURATION (simulated seconds) and SEED,
# same trades.csv and performance.csv, byte for byte. No relay or monitor: a fresh run
# directory, the exchange on free ports (no fsync: the run is reproduced from DURATION
# and SEED), the bots over two worker processes, the report.
demo-lockstep: $(NATIVE)
	@dir=runs/lockstep-$$(date -u +%Y%m%d-%H%M%S); mkdir -p $$dir; \
	$(PY) exchange_server.py --clock sim --journal-flush off --port 0 --events-port 0 \
	    --data-dir $$dir \
	    > $$dir/exchange.out 2> $$dir/exchange.log & pid=$$!; \
	for i in $$(seq 100); do grep -q '^READY' $$dir/exchange.out && break; sleep 0.1; done; \
	gw=$$(sed -n 's/^READY .*"gateway": *"\([^"]*\)".*/\1/p' $$dir/exchange.out); \
	$(PY) bot_battle_runner.py --lockstep --workers 2 --duration $(DURATION) --seed $(SEED) \
	    --exchange-uri $$gw; status=$$?; \
	kill -TERM $$pid; wait $$pid; \
	$(PY) report.py --data-dir $$dir; echo "run directory: $$dir"; exit $$status

test: $(NATIVE)
	$(PY) -m ruff check .
	$(PY) -m pytest -q
	OPENMARKETSIM_CORE=pure $(PY) -m pytest -q $(CORE_TESTS)

test-long: $(NATIVE)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(NATIVE)
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_gateway.py
	$(PY) bench/bench_feed.py
	$(PY) bench/bench_recovery.py

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .hypothesis .mypy_cache
