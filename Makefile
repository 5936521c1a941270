# The two set-up commands: `make demo` and `make test`. Both create .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export DS_ACCELERATOR ?= cpu
# The venv first on PATH, as when it is activated: DeepSpeed compiles its CPU comm op with the
# `ninja` found there, and a different ninja (e.g. /usr/bin/ninja) forces a rebuild of the cache.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-fast bench clean kjv-books

install: $(STAMP)

# torch goes first so pip never pulls a CUDA build for the packages that depend on it.
# The last step compiles DeepSpeed's CPU shared-memory comm op once (~30 s, cached in
# ~/.cache/torch_extensions) so no test or demo pays for it.
$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$$(grep '^torch==' requirements.txt)"
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/memtrain demo

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# Real English text for configs/kjv.yaml: the 66 books of the King James Bible, one file each,
# from the Debian package bible-kjv (`apt-get install bible-kjv`; .ci/run installs it).
kjv-books: $(STAMP)
	$(PY) -m data_prep.kjv runs/kjv/books

clean:
	rm -rf runs mlflow.db mlruns
