# The one entry point for humans and CI. Each target sets itself up.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the tests and the demo use (installed with apt-get when missing and root).
APT_PACKAGES := mosquitto mosquitto-clients openssh-server openssh-client systemd systemd-container dpkg-dev lintian debootstrap python3-venv procps
STAMP := $(VENV)/.installed

.PHONY: all test test-fast lint typecheck pytest demo bench deb proto clean deps venv wheel greengrass

all: test

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; \
	  else echo "need root or sudo to install:$$missing" >&2; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check agent tests
	$(VENV)/bin/ruff format --check agent tests
	$(VENV)/bin/lint-imports --no-cache --no-logo  # the import contracts in pyproject.toml

typecheck: venv
	$(VENV)/bin/mypy agent

pytest: venv deps
	PYTHONASYNCIODEBUG=1 $(VENV)/bin/pytest -q -p no:randomly tests $(PYTEST_ARGS)

test: deps venv lint typecheck pytest

# The inner loop: unit and in-process tests, without tests/packaging and without the tests marked
# integration or slow (`make test` runs everything). `make test-fast PYTEST_ARGS=--lf` reruns failures.
test-fast: venv deps
	PYTHONASYNCIODEBUG=1 $(VENV)/bin/pytest -q -p no:randomly -m "not integration and not slow and not aws" \
	  --ignore=tests/packaging tests $(PYTEST_ARGS)

demo: deps venv
	$(PY) -m agent.emulator.demo

# Figures, not pass/fail. Each script takes --json; tunnel_bench.py also --localproxy PATH.
bench: deps venv
	$(PY) -m compileall -q agent  # measure as installed: pip and the .deb compile bytecode
	$(PY) tests/bench/tunnel_bench.py --floor
	$(PY) tests/bench/api_bench.py
	$(PY) tests/bench/notify_bench.py
	$(PY) tests/bench/agent_bench.py
	$(PY) -m tests.protocol.bench_protocol

proto: venv
	$(PY) -m grpc_tools.protoc -Iagent/protocol --python_out=agent/protocol/_pb --pyi_out=agent/protocol/_pb agent/protocol/message.proto

deb: deps venv
	bash packaging/debian/build.sh

# dist/iot_tunnel_agent-<version>-py3-none-any.whl and the sdist beside it: what `pip install`
# takes while the package is not on a public index. Needs python3 with venv (Debian: python3-venv)
# and PyPI or a mirror once, for the build tools; the development .venv is not used.
WHEEL_ENV := build/wheel-env
$(WHEEL_ENV)/.installed:
	@test -x $(WHEEL_ENV)/bin/python || python3 -m venv $(WHEEL_ENV)
	$(WHEEL_ENV)/bin/python -m pip install -q build 'setuptools>=69' wheel
	@touch $@

# The last commit's time in every archive entry: the same tree builds the same bytes.
wheel greengrass: export SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)
wheel: $(WHEEL_ENV)/.installed
	rm -f dist/iot_tunnel_agent-*.whl dist/iot_tunnel_agent-*.tar.gz
	$(WHEEL_ENV)/bin/python -m build -q --no-isolation --outdir dist .

# dist/greengrass/artifacts/<component>/<version>/iot-tunnel-agent-{x86_64,aarch64,armv7l}.zip
# (the wheel and every runtime dependency's wheel, installed offline on the core) and
# dist/greengrass/recipes/recipe.yaml rendered with the version, as the GDK lays them out.
# GREENGRASS_BUCKET=my-bucket writes the S3 bucket into the recipe's artifact URIs.
greengrass: wheel
	$(WHEEL_ENV)/bin/python packaging/greengrass/build.py --output dist/greengrass \
	  $(if $(GREENGRASS_BUCKET),--bucket $(GREENGRASS_BUCKET))

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
