# One entry point for people and CI. Every target sets up what it needs, idempotently.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MTD := $(VENV)/bin/mtd
STATE ?= desired_state
HOST ?=
DEB_PACKAGES := nftables python3-nftables redis-server nmap git iproute2 python3-venv procps gnupg fail2ban man-db
HOST_ARG := $(if $(HOST),--host $(HOST),)

.PHONY: setup deb venv bindings-path lock man test unit lint diff apply rotate status demo bench bench-quick install fuzz clean

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

# The venv holds exactly the versions in $(LOCK) (hashes checked, no dependency resolved here)
# and sees none of the host's Python packages: only the libnftables bindings come from the
# system (see BINDINGS). Rebuilt whole when the lock, pyproject.toml or the interpreter
# change, so nothing a lock no longer names stays behind; otherwise a second run does nothing.
LOCK := requirements/dev.lock
venv: deb
	@want="$$(cat $(LOCK) pyproject.toml | sha256sum | cut -c1-16) $$(readlink -f /usr/bin/python3)"; \
	if [ "$$(cat $(VENV)/.installed 2>/dev/null)" != "$$want" ]; then \
	  set -e; rm -rf $(VENV); /usr/bin/python3 -m venv $(VENV); \
	  $(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r $(LOCK); \
	  $(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .; \
	  $(MAKE) -s bindings-path PYTHON=$(PY) DEST=$(CURDIR)/$(VENV)/nftables-bindings; \
	  echo "$$want" > $(VENV)/.installed; \
	fi

# The libnftables bindings are Debian's python3-nftables, made for the system's libnftables:
# one directory holding only a link to that package's module, named in a .pth file of the
# venv of $(PYTHON), puts `nftables` on its path and nothing else of the system's.
# $(DEST) is where the link lives once installed; $(DESTDIR) prefixes what is written.
bindings-path:
	@module=$$(dpkg-query -L python3-nftables | grep -m1 '/nftables/__init__.py$$' | xargs -r dirname); \
	test -n "$$module" || { echo "python3-nftables is not installed" >&2; exit 1; }; \
	site=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	install -d $(DESTDIR)$(DEST) && ln -sfn $$module $(DESTDIR)$(DEST)/nftables; \
	echo $(DEST) > $(DESTDIR)$${site#$(DESTDIR)}/mtd-nftables-bindings.pth

# Regenerates the locks from pyproject.toml (newest versions that fit) with pip-tools in a
# throwaway venv: the runtime lock first, then the dev lock constrained to it. Review the
# diff, run `make test`, commit both.
COMPILE := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && /usr/bin/python3 -m venv $$tmp && \
	$$tmp/bin/python -m pip install -q --disable-pip-version-check pip-tools && \
	$$tmp/bin/pip-compile $(COMPILE) --upgrade -o requirements/runtime.lock pyproject.toml && \
	$$tmp/bin/pip-compile $(COMPILE) --upgrade --extra dev -o requirements/dev.lock \
	  pyproject.toml requirements/dev.in

# The man pages and the bash completion script, made from --help and the state's schema
# (tests/test_manual.py fails when the committed ones differ from what this makes).
man: setup
	$(PY) -m reconciler.cli.manual man

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
