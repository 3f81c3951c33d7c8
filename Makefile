# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench chaos proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[agent,pipeline,dashboards,dev]"
	touch $@

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash deploy/local/demo.sh

lint: install
	$(PY) -m ruff check quotaflow producers streams sinks dashboards bench tests
	$(PY) -m mypy

test: install lint
	$(PY) -m pytest -ra

bench: install
	$(PY) bench/throughput.py

# The fault matrix on local servers (takes a while; not part of `make test`):
# crashes, outages, poison input, a soak. Options: bench/chaos.py --help.
chaos: install
	$(PY) bench/chaos.py

# Regenerate producers/sources/_pb/ from producers/sources/proto/*.proto (grpcio-tools).
proto: install
	$(PY) producers/sources/proto/generate.py

clean:
	rm -rf $(VENV) .quotaflow-state *.egg-info
