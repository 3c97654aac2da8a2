# One entry point for people and CI. Every target sets up what it needs, idempotently.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MTD := $(VENV)/bin/mtd
STATE ?= desired_state
HOST ?=
DEB_PACKAGES := nftables python3-nftables redis-server nmap git iproute2 python3-venv procps gnupg
HOST_ARG := $(if $(HOST),--host $(HOST),)

.PHONY: setup deb venv test unit lint diff apply rotate status demo bench fuzz clean

setup: deb venv

# Installs only the Debian packages that are missing, so a second run changes nothing.
deb:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv comes from Debian's python3 so it can import python3-nftables.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | deb
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

test: setup
	$(PY) -m ruff check reconciler tests benchmarks
	$(PY) -m pytest -q -ra

unit: setup
	$(PY) -m pytest -q -m 'not netns'

lint: setup
	$(PY) -m ruff check reconciler tests benchmarks
	$(PY) -m ruff format --check reconciler tests benchmarks

# `mtd diff` exits 2 when changes are pending: a preview, not a failure of make.
diff: setup
	@$(MTD) --state $(STATE) diff $(HOST_ARG) || [ $$? -eq 2 ]

apply: setup
	$(MTD) --state $(STATE) apply $(HOST_ARG)

rotate: setup
	$(MTD) --state $(STATE) rotate $(HOST_ARG)

status: setup
	$(MTD) --state $(STATE) status $(HOST_ARG)

demo: setup
	$(PY) -m reconciler.lab.demo

bench: setup
	$(PY) benchmarks/bench.py

# The differential oracle's long run (tests/test_oracle.py): random probe sequences against
# mtd and a twin host on the shuffled ports; prints how many it tried.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	MTD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s \
	  tests/test_oracle.py -k twin_on_the_shuffled --timeout 0

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
