# OpenMarketSim. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DURATION ?= 60
SEED ?= 42
DEMO_ARGS ?=

.PHONY: demo demo-lockstep test test-long lint bench clean

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit("OpenMarketSim needs Python 3.10+") if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py --duration $(DURATION) --seed $(SEED) $(DEMO_ARGS)

# The battle in simulated time (lockstep): same DURATION (simulated seconds) and SEED,
# same trades.csv and performance.csv, byte for byte. No relay or monitor: a fresh run
# directory, the exchange on free ports (no fsync: the run is reproduced from DURATION
# and SEED), the bots over two worker processes, the report.
demo-lockstep: $(STAMP)
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
