# bpcp: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PLATE ?= example-plate
# CellProfiler 4.2.8.1 needs Python 3.9: the tests install it beside 5.0 when one is found.
PYTHON39 ?= $(firstword $(wildcard /usr/bin/python3.9 /usr/local/bin/python3.9 /root/.pyenv/versions/3.9*/bin/python3.9))

.PHONY: setup hosts demo test test-python lint-python test-ansible clean

## setup: the controller's virtualenv (.venv) with bpcp, Ansible, Molecule and linters, pinned
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/lock.txt -e '.[dev]'
	touch $@

## hosts: configure every inventory host as a worker (default: this machine)
hosts: setup
	$(BIN)/ansible-playbook site.yml

## demo: set up this machine and run the example plate end to end; results in $(PLATE)/run
demo: hosts
	$(BIN)/bpcp example $(PLATE)
	$(BIN)/ansible-playbook run.yml -e dataset=$(PLATE)/load_data.csv \
	  -e pipeline=$(PLATE)/example_loaddata.cppipe -e output=$(PLATE)/run

## test: everything CI runs: configure this machine, the Python suite (real CellProfiler, real
## GNU parallel), then yamllint, ansible-lint and every Molecule scenario in Docker
test: setup
	extra=(); if [ -n "$(PYTHON39)" ]; then \
	  extra=(-e '{"cellprofiler_extra_versions": ["4.2.8.1"]}' -e "cellprofiler_python39=$(PYTHON39)"); fi; \
	$(BIN)/ansible-playbook site.yml "$${extra[@]}"
	$(MAKE) test-python test-ansible

test-python: setup lint-python
	$(BIN)/python -m pytest -ra

## lint-python: ruff over the Python, mypy over the pure modules (pyproject.toml says which)
lint-python: setup
	$(BIN)/ruff check bpcp tests benchmarks
	$(BIN)/mypy

test-ansible: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/test-ansible.sh

clean:
	rm -rf $(VENV) $(PLATE) .pytest_cache
