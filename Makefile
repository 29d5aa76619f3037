# gppy-stage: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the science needs (binaries: source-extractor, scamp, SWarp, missfits, solve-field)
DEBS = source-extractor scamp swarp missfits astrometry.net astrometry-data-tycho2
TOOLS = source-extractor scamp SWarp missfits solve-field
# and what only the tests need: podman with runc and a base from debootstrap to build the container
# image (podman needs its recommended packages, slirp4netns, netavark..., for a build with network),
# python3-venv for the test that installs the package into a fresh venv
TEST_DEBS = podman buildah runc debootstrap uidmap fuse-overlayfs python3-venv
TEST_TOOLS = podman runc debootstrap
DEMO_ROOT ?= demo-night
PYTEST_ARGS ?=

.PHONY: help deps-debian deps-debian-test install-runtime install test test-fast demo bench render check-manifests images clean

help:
	@echo "make demo   simulate a small 7DT night and run the pipeline on it (./$(DEMO_ROOT))"
	@echo "make test   install everything needed (Python and Debian packages) and run the tests"
	@echo "make bench  benchmarks with ratios against named baselines"
	@echo "make render / check-manifests / images   the cluster side (see docs/deploy.md)"

deps-debian:
	@missing=""; \
	for b in $(TOOLS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	ls /usr/share/astrometry/index-tycho2-*.fits >/dev/null 2>&1 || missing="$$missing tycho2-index"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages (missing:$$missing)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBS) >/dev/null; \
	fi

deps-debian-test: deps-debian
	@missing=""; \
	for b in $(TEST_TOOLS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	$(PYTHON) -c "import ensurepip" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the tests (missing:$$missing)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(TEST_DEBS) >/dev/null; \
	fi

# what a user installs: the package's own dependencies, no test extras (tests/test_install.py
# proves in a fresh venv that these are enough for a night)
install-runtime: deps-debian
	$(PIP) install -q --disable-pip-version-check -e .

install: deps-debian-test
	$(PIP) install -q --disable-pip-version-check -e ".[test]"

# both cores: the full-size tests are minutes each; loadfile keeps a module's tests (and the
# full-size night they share) on one worker
PYTEST_WORKERS ?= 2
test: install
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not container" $(PYTEST_ARGS)

demo: install-runtime
	rm -rf $(DEMO_ROOT)
	gppy sim night --out $(DEMO_ROOT) --unit 7DT01 --night 2025-01-01 --filters m425,m475 --seed 7 > /dev/null
	gppy night run --root $(DEMO_ROOT) --obs 7DT01 --night 2025-01-01_gain2750
	@gppy sim check --root $(DEMO_ROOT) --obs 7DT01 --night 2025-01-01_gain2750

bench: install
	$(PYTHON) bench/bench_masters.py
	@if [ -f bench/bench_subtract.py ]; then $(PYTHON) bench/bench_subtract.py; fi

# a full-size night stage by stage as Argo runs it (simulated once at /tmp/fullnight); the README's table
bench-full: install
	$(PYTHON) bench/bench_full.py --json /tmp/bench-full.json $(BENCH_FULL_ARGS)

clean:
	rm -rf $(DEMO_ROOT) .pytest_cache build *.egg-info

# render, check-manifests, images, images-gpu
include images/Makefile.inc
