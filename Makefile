# `make run`: set up and train the default model (1-D CNN on MNIST-1D, 2 local workers).
# `make test`: set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

run: setup
	$(VENV)/bin/scalesgd train

test: setup
	$(PY) -m pytest -q

bench: setup
	mkdir -p bench/out
	$(VENV)/bin/scalesgd allreduce-bench --json bench/out/allreduce_bench.json --plot bench/out/allreduce_bench.png
	$(PY) bench/throughput.py
	$(PY) bench/diversity_overhead.py
	$(PY) bench/time_to_accuracy.py

clean:
	rm -rf $(VENV) runs .pytest_cache
