# One entry point for people and CI. Every target sets up what it needs, idempotently.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MTD := $(VENV)/bin/mtd
STATE ?= desired_state
HOST ?=
DEB_PACKAGES := nftables python3-nftables python3-yaml redis-server nmap git iproute2 python3-venv \
	procps gnupg fail2ban man-db crowdsec prometheus
HOST_ARG := $(if $(HOST),--host $(HOST),)

.PHONY: setup deb venv lock man package package-test test unit lint diff apply rotate status demo bench bench-quick install fuzz clean

setup: deb venv

# Installs only the Debian packages that are missing, so a second run changes nothing.
# crowdsec's postinst registers to the Central API unless its credentials file exists (it
# fails offline, leaving the package half-configured): the tests need its Local API alone.
deb:
	@missing=$$(for p in $(DEB_PACKAGES) $(EXTRA_DEB_PACKAGES); do \
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

# The venv holds exactly the versions in $(LOCK) (hashes checked, no dependency resolved here)
# and sees none of the host's Python packages: only the libnftables bindings come from the
# system (see system_modules). Rebuilt whole when the lock, pyproject.toml or the interpreter
# change, so nothing a lock no longer names stays behind; otherwise a second run does nothing.
LOCK := requirements/dev.lock
venv: deb
	@want="$$(cat $(LOCK) pyproject.toml | sha256sum | cut -c1-16) $$(readlink -f /usr/bin/python3)"; \
	if [ "$$(cat $(VENV)/.installed 2>/dev/null)" != "$$want" ]; then \
	  set -e; rm -rf $(VENV); /usr/bin/python3 -m venv $(VENV); \
	  $(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r $(LOCK); \
	  $(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .; \
	  $(call system_modules,$(VENV),$(CURDIR)/$(VENV),nftables); \
	  echo "$$want" > $(VENV)/.installed; \
	fi

# Modules a venv takes from Debian's python3 packages, and nothing else of the system's: a
# directory in the venv holding only links to them, named by a .pth file. The libnftables
# bindings always (python3-nftables is made for the system's libnftables); an install also
# takes PyYAML (python3-yaml links the system's libyaml, which Debian's security updates
# reach; the wheel's copy is built in) and drops the locked copy.
# $(call system_modules,VENV AS BUILT,VENV ONCE INSTALLED,MODULES)
DIST_PACKAGES := /usr/lib/python3/dist-packages
system_modules = install -d $(1)/system-modules && for m in $(3); do \
	  test -e $(DIST_PACKAGES)/$$m || { echo "no $$m in $(DIST_PACKAGES): apt install python3-$${m\#_}" >&2; exit 1; }; \
	  ln -sfn $(DIST_PACKAGES)/$$m $(1)/system-modules/$$m; \
	done && echo $(2)/system-modules > $$(echo $(1)/lib/python3*/site-packages)/mtd-system-modules.pth

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

# Installs mtd on this server, laid out as the Debian package lays it out: a venv in $(OPT)
# holding exactly requirements/runtime.lock and mtd (no host Python package but Debian's
# nftables bindings and PyYAML: see system_modules), the command in $(BINDIR), man pages and bash completion under $(PREFIX),
# the example state in $(ETC) unless a state is there, the unit in $(UNITDIR) (its ExecStart
# pointing at $(BINDIR)/mtd), README.md and docs/ in $(DOCDIR), and the fail2ban action in
# $(FAIL2BANDIR) when that is set. The venv is built beside the old one and swapped in whole.
# Every directory can be moved, and $(DESTDIR) prefixes them all (packaging, a test).
OPT ?= /opt/mtd
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
ETC ?= /etc/mtd
UNITDIR ?= /etc/systemd/system
DOCDIR ?= /usr/share/doc/mtd
FAIL2BANDIR ?=
DESTDIR ?=
install: venv
	@case "$(OPT)" in /?*) ;; *) echo "OPT=$(OPT): expected an absolute directory" >&2; exit 1;; esac
	@[ ! -e $(DESTDIR)$(OPT) ] || [ -f $(DESTDIR)$(OPT)/pyvenv.cfg ] || \
	  { echo "$(DESTDIR)$(OPT) exists and is no venv: not replacing it" >&2; exit 1; }
	@set -e; new=$(DESTDIR)$(OPT).new; wheels=$$(mktemp -d); trap 'rm -rf $$wheels' EXIT; \
	rm -rf $$new; /usr/bin/python3 -m venv --without-pip $$new; \
	sed -i '/^command = /d' $$new/pyvenv.cfg; \
	pip="$(PY) -m pip --disable-pip-version-check --python $$new/bin/python"; \
	$$pip install -q --no-compile --require-hashes --no-deps -r requirements/runtime.lock; \
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w $$wheels .; \
	$$pip install -q --no-compile --no-deps $$wheels/mtd-*.whl; \
	find $$new/bin -mindepth 1 ! -name 'python*' ! -name mtd -delete; \
	sed -i '1s|.*|#!$(OPT)/bin/python|' $$new/bin/mtd; \
	site=$$(echo $$new/lib/python3*/site-packages); \
	rm -rf $$new/share $$new/include $$site/reconciler/share $$site/*.dist-info/direct_url.json \
	  $$site/yaml $$site/_yaml $$site/[Pp][Yy][Yy][Aa][Mm][Ll]-*.dist-info; \
	find $$site -name '*.py' -perm /111 -exec chmod a-x {} +; \
	grep -rlZ --include='*.py' -m1 '^#!' $$site | xargs -0r sed -i '1s/^#!.*/#/'; \
	$(call system_modules,$$new,$(OPT),nftables yaml _yaml); \
	rm -rf $(DESTDIR)$(OPT); mv $$new $(DESTDIR)$(OPT); \
	if [ -z "$(DESTDIR)" ]; then $(OPT)/bin/python -m compileall -q $(OPT)/lib; fi
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR) \
	  $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(COMPLETIONDIR)
	ln -sfn $(OPT)/bin/mtd $(DESTDIR)$(BINDIR)/mtd
	install -m 0644 man/mtd.8 $(DESTDIR)$(MANDIR)/man8/mtd.8
	install -m 0644 man/mtd.yaml.5 $(DESTDIR)$(MANDIR)/man5/mtd.yaml.5
	install -m 0644 man/mtd.bash-completion $(DESTDIR)$(COMPLETIONDIR)/mtd
	install -d -m 0755 $(DESTDIR)$(ETC)
	@ls $(DESTDIR)$(ETC)/*.yaml >/dev/null 2>&1 || install -m 0644 desired_state/mtd.yaml $(DESTDIR)$(ETC)/state.yaml
	sed 's|/usr/local/bin/mtd|$(BINDIR)/mtd|; s|--state /etc/mtd|--state $(ETC)|' \
	  systemd/mtd.service > $(DESTDIR)$(UNITDIR)/mtd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/mtd.service
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -d $(DESTDIR)$(DOCDIR)/docs
	install -m 0644 docs/*.md $(DESTDIR)$(DOCDIR)/docs/
	@if [ -n "$(FAIL2BANDIR)" ] && [ ! -e $(DESTDIR)$(FAIL2BANDIR)/mtd.conf ]; then \
	  install -d $(DESTDIR)$(FAIL2BANDIR); \
	  install -m 0644 contrib/fail2ban/action.d/mtd.conf $(DESTDIR)$(FAIL2BANDIR)/mtd.conf; \
	fi
	@[ -n "$(DESTDIR)" ] || echo "installed: $(BINDIR)/mtd, state in $(ETC), unit $(UNITDIR)/mtd.service;" \
	  "next: edit $(ETC)/state.yaml, mtd validate, systemctl daemon-reload, systemctl enable --now mtd"

# The Debian package (debian/): built from a copy of this tree (tracked and untracked files,
# nothing ignored) in build/deb, put in dist/, checked by lintian (an error fails the build).
# `make package-test` installs it, uses it and purges it (tests/test_deb.py; CI runs it).
PACKAGING_DEBS := debhelper dh-python dpkg-dev lintian
VERSION := $(shell head -1 debian/changelog | awk '{print $$2}' | tr -d '()')
package:
	@$(MAKE) -s deb EXTRA_DEB_PACKAGES="$(PACKAGING_DEBS)"
	rm -rf build/deb && mkdir -p build/deb/mtd-$(VERSION) dist
	git ls-files -z --cached --others --exclude-standard | \
	  tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C build/deb/mtd-$(VERSION)
	cd build/deb/mtd-$(VERSION) && dpkg-buildpackage -b -us -uc --no-sign >../build.log 2>&1 \
	  || { tail -40 ../build.log; exit 1; }
	rm -f dist/mtd_*.deb && mv build/deb/mtd_$(VERSION)_*.deb dist/
	lintian --fail-on error --info dist/mtd_$(VERSION)_*.deb

package-test: package
	MTD_DEB=$$(echo dist/mtd_$(VERSION)_*.deb) $(PY) -m pytest -q -p no:cacheprovider tests/test_deb.py

# The differential oracle's long run (tests/test_oracle.py): random probe sequences against
# mtd and a twin host on the shuffled ports; prints how many it tried.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	MTD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s \
	  tests/test_oracle.py -k "twin_on_the_shuffled or timing" --timeout 0

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
