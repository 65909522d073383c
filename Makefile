# The two commands of the README: `make demo` and `make test`. Both create .venv
# on a fresh machine, install the project into it, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# dev + serve: the serving tests run a real Triton (pytriton), which needs numpy<2.
# Pinned for CI and dev installs only (pyproject leaves users free): these
# wheels lie on the build machines' disk.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.clipfuse-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipfuse demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf engines/demo .pytest_cache
