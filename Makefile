# rackpower: `make test` and `make demo` work on a fresh Debian 12 machine.
#
# System packages the tests need are listed once, as command:debian-package
# pairs; `make system-deps` installs the ones whose command is missing.
# Later work adds to this list (Mosquitto, VictoriaMetrics, net-snmp, mbpoll,
# Slurm, munge, Chromium).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SYSTEM_DEPS := mbpoll:mbpoll snmpget:snmp snmpd:snmpd collectd:collectd-core
SYSTEM_DEPS += mosquitto:mosquitto victoria-metrics:victoria-metrics openssl:openssl chromium:chromium
SYSTEM_DEPS += promtool:prometheus
SYSTEM_DEPS += slurmctld:slurmctld slurmd:slurmd slurmrestd:slurmrestd munged:munge scontrol:slurm-client

ifeq ($(shell id -u),0)
SUDO :=
else
SUDO := sudo
endif

.PHONY: test demo lint typecheck unit venv system-deps bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

system-deps: slurm-deps
	@missing=""; \
	for pair in $(SYSTEM_DEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# slurmrestd's JWT auth is a plugin library, not a command: checked by its path.
.PHONY: slurm-deps
slurm-deps:
	@ls /usr/lib/*/slurm-wlm/auth_jwt.so >/dev/null 2>&1 || { \
	  echo "installing Debian packages: slurm-wlm-jwt-plugin"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends slurm-wlm-jwt-plugin; }

# ruff format --check: one formatting, so diffs show changes, not style.
# lint-imports: the layer contracts in pyproject.toml ([tool.importlinter]).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# mypy --strict over controller, drivers, sim, tests and benchmarks ([tool.mypy] packages).
typecheck: venv
	$(BIN)/mypy

# Pure tests only: no servers, seconds.
unit: venv
	$(BIN)/pytest tests/unit

test: venv system-deps lint typecheck
	$(BIN)/pytest

# The demo site on the embedded simulator; Ctrl-C stops it (DEMO_ARGS="--duration 60").
demo: venv
	$(BIN)/rackpower demo $(DEMO_ARGS)

# Every benchmark module with a main block; helper modules (no main) are skipped.
bench: venv
	@mkdir -p out
	@for m in $$(grep -l '__main__' benchmarks/*.py); do \
	  name=$$(basename $$m .py); \
	  echo "== benchmarks.$$name"; \
	  $(BIN)/python -m benchmarks.$$name --json out/bench-$$name.json || exit 1; \
	done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis out
