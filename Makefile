# `make run`: set up and train the default model (1-D CNN on MNIST-1D, 2 local workers).
# `make test`: set up and run the tests. `make test-fast`: only the tests that start no process (no workers,
# no subprocess); tests/conftest.py fails any unmarked test that does.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

run: setup
	$(VENV)/bin/scalesgd train

test: setup
	$(PY) -m pytest -q

test-fast: setup
	SCALESGD_TEST_TIER=fast $(PY) -m pytest -q -m "not spawn"

bench: setup
	mkdir -p bench/out
	$(VENV)/bin/scalesgd allreduce-bench --json bench/out/allreduce_bench.json --plot bench/out/allreduce_bench.png
	$(PY) bench/throughput.py
	$(PY) bench/diversity_overhead.py
	$(PY) bench/time_to_accuracy.py

clean:
	rm -rf $(VENV) runs .pytest_cache
