# All set-up happens here: `make demo` and `make test` bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch/torchvision are pinned here only (this platform serves these two from local files);
# pyproject.toml keeps ranges so other machines (e.g. a GPU box with torch 2.11) can install.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(PY) scripts/demo.py --out demo_out

bench: $(STAMP)
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
