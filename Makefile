# Two entry points: `make demo` and `make test`. Both install what is missing first.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fieldtrain-installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/fieldtrain/torch_extensions
export RAY_DATA_DISABLE_PROGRESS_BARS ?= 1

.PHONY: demo test sysdeps venv bench-comm clean

demo: sysdeps venv
	$(VENV)/bin/fieldtrain demo

test: sysdeps venv
	$(PY) -m pytest -q

# System packages (OpenMPI; slurm-wlm and munge for the real-Slurm tests): installed when absent and we
# may install them, otherwise a message says what to install.
sysdeps:
	@bash .ci/sysdeps.sh

venv: $(STAMP)

# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	@touch $@

clean:
	rm -rf runs .pytest_cache
