# Two entry points for a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch/torchvision pinned here for these x86_64 machines (served from local disk);
	# pyproject keeps loose ranges for users' own torch.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[all]'
	# tests/test_ui.py drives the system's Chromium (Playwright never downloads one), and the shared-store
	# tests start PostgreSQL servers from Debian's binaries and from the pgserver wheel's (tests/postgres.py,
	# one per major version); CI runs as root.
	command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

# Every headline ratio of the README against its baseline, measured in one run (~17 min on 2 cores):
# writes benchmarks/results/summary.md. BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(BIN)/python benchmarks/summary.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .umig demo-store
