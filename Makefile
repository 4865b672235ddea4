VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: deps demo test test-unit test-bpf test-e2e bench clean

deps:
	./scripts/install-deps

demo: deps
	$(PY) -m agent.demo --vip

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: deps
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-bpf: deps
	$(PY) -m pytest -m bpf $(PYTEST_ARGS)

test-e2e: deps
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info

# Benchmarks are measurements, not tests: run by hand, each prints absolute figures and ratios
# against a reference measured in the same run.
bench: deps
	$(PY) benchmarks/datapath_ns.py
	$(PY) benchmarks/datapath_conn.py
	$(PY) benchmarks/bgp_scale.py
	$(PY) benchmarks/bfd_scale.py
	$(PY) benchmarks/datapath_throughput.py
