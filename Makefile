# One entry point for people and CI. Every target sets up what it needs, idempotently.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MTD := $(VENV)/bin/mtd
STATE ?= desired_state
HOST ?=
DEB_PACKAGES := nftables python3-nftables redis-server nmap git iproute2 python3-venv procps gnupg \
	fail2ban crowdsec prometheus
HOST_ARG := $(if $(HOST),--host $(HOST),)

.PHONY: setup deb venv test unit lint diff apply rotate status demo bench bench-quick install fuzz clean

setup: deb venv

# Installs only the Debian packages that are missing, so a second run changes nothing.
# crowdsec's postinst registers to the Central API unless its credentials file exists (it
# fails offline, leaving the package half-configured): the tests need its Local API alone.
deb:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if printf '%s\n' $$missing | grep -qx crowdsec; then \
	    install -d -m 755 /etc/crowdsec; \
	    [ -s /etc/crowdsec/online_api_credentials.yaml ] || \
	      echo '# no Central API: the tests use a Local API alone' > /etc/crowdsec/online_api_credentials.yaml; \
	  fi; \
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

# make bench ARGS='--sizes 10,1000 --runs 3' passes options to benchmarks/bench.py
# (`make bench --quick` would be an option of make itself).
ARGS ?=
bench: setup
	$(PY) benchmarks/bench.py $(ARGS)

bench-quick: setup
	$(PY) benchmarks/bench.py --quick $(ARGS)

# Installs mtd on this server: a venv in $(OPT) made from Debian's python3 (it sees
# python3-nftables), the command in $(BINDIR)/mtd, the example state in $(ETC) unless a state
# is already there, the unit in $(UNITDIR) (its ExecStart pointing at $(BINDIR)/mtd) and
# this README in $(DOCDIR). Every directory can be moved, for packaging or a test.
OPT ?= /opt/mtd
BINDIR ?= /usr/local/bin
ETC ?= /etc/mtd
UNITDIR ?= /etc/systemd/system
DOCDIR ?= /usr/share/doc/mtd
install: deb
	@test -x $(OPT)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(OPT)
	$(OPT)/bin/python -m pip install -q --disable-pip-version-check .
	install -d $(BINDIR) $(UNITDIR) $(DOCDIR)
	ln -sfn $(OPT)/bin/mtd $(BINDIR)/mtd
	install -d -m 0755 $(ETC)
	@ls $(ETC)/*.yaml >/dev/null 2>&1 || install -m 0644 desired_state/mtd.yaml $(ETC)/state.yaml
	sed 's|/usr/local/bin/mtd|$(BINDIR)/mtd|; s|--state /etc/mtd|--state $(ETC)|' \
	  systemd/mtd.service > $(UNITDIR)/mtd.service
	install -m 0644 README.md $(DOCDIR)/README.md
	@echo "installed: $(BINDIR)/mtd, state in $(ETC), unit $(UNITDIR)/mtd.service;" \
	  "next: edit $(ETC)/state.yaml, mtd validate, systemctl daemon-reload, systemctl enable --now mtd"

# The differential oracle's long run (tests/test_oracle.py): random probe sequences against
# mtd and a twin host on the shuffled ports; prints how many it tried.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	MTD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s \
	  tests/test_oracle.py -k twin_on_the_shuffled --timeout 0

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
