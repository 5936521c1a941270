# The two set-up commands: `make demo` and `make test`. Both create .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export DS_ACCELERATOR ?= cpu
# The venv first on PATH, as when it is activated: DeepSpeed compiles its CPU comm op with the
# `ninja` found there, and a different ninja (e.g. /usr/bin/ninja) forces a rebuild of the cache.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install system-deps demo test test-fast bench clean kjv-books

install: $(STAMP)

# torch goes first so pip never pulls a CUDA build for the packages that depend on it.
# The last step compiles DeepSpeed's CPU shared-memory comm op once (~1 min, cached in
# ~/.cache/torch_extensions) so no test or demo pays for it. A build that outlasts 10 minutes
# is stuck (a CI install once hung here until its 90-minute limit): its cache, where a stale
# build lock would sit, is cleared and the build tried once more. Each step is timestamped.
BUILD_DS_OP := $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
DS_OP_TIMEOUT ?= 600
TORCH_EXT_CACHE = $${TORCH_EXTENSIONS_DIR:-$$HOME/.cache/torch_extensions}
$(STAMP): requirements.txt pyproject.toml
	@date -u "+make install: %T venv"
	python3 -m venv $(VENV)
	@date -u "+make install: %T torch"
	$(VENV)/bin/pip install --quiet "$$(grep '^torch==' requirements.txt)"
	@date -u "+make install: %T requirements"
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	@date -u "+make install: %T DeepSpeed CPU comm op"
	timeout $(DS_OP_TIMEOUT) $(BUILD_DS_OP) || { echo "make install: the DeepSpeed op build failed or hung; clearing $(TORCH_EXT_CACHE) and trying once more"; \
	  rm -rf "$(TORCH_EXT_CACHE)"; timeout $(DS_OP_TIMEOUT) $(BUILD_DS_OP); }
	@date -u "+make install: %T done"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/memtrain demo

# Debian packages the full suite uses: the real-text tests read the King James Bible (bible-kjv),
# the launcher tests start a real mpirun (openmpi-bin), CPU ranks preload jemalloc when it is there
# (libjemalloc2). As root they are installed here; otherwise one line says what to install.
SYSTEM_PACKAGES := bible-kjv openmpi-bin libjemalloc2

system-deps:
	@dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else echo "make: the test suite needs the Debian packages: $(SYSTEM_PACKAGES) (sudo apt-get install them)"; exit 1; fi; }

# Two pytest-xdist workers by default (a 2-core machine: ~23 min instead of 33): many tests wait on
# process start-up and gloo between tiny 2-rank steps. Tests that share an expensive session fixture
# run on one worker (the scheduler in tests/conftest.py); servers the tests start take ports outside
# the kernel's bind(0) range (tests/support/ports.py). TEST_WORKERS=0 runs one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -ra -n $(TEST_WORKERS)

test: $(STAMP) system-deps
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# Real English text for configs/kjv.yaml: the 66 books of the King James Bible, one file each,
# from the Debian package bible-kjv (`apt-get install bible-kjv`; .ci/run installs it).
kjv-books: $(STAMP)
	$(PY) -m data_prep.kjv runs/kjv/books

clean:
	rm -rf runs mlflow.db mlruns
