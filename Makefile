# robustbench_lab: `make demo`, `make test`, `make lab`. Each creates .venv when missing and installs the project.
#
# CPU machines: torch is pinned through $(CONSTRAINTS) so pip never resolves a CUDA build.
# GPU machines: install a CUDA torch first, then skip the CPU pin, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu126
#   make test CONSTRAINTS=
# CPU machines without a local CPU wheel: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
NBDEV_WORKERS ?= 2

.PHONY: venv demo test lab export sync-check nbtest pytest clean-runs

# Installs when .venv is missing or pyproject.toml/constraints changed in content (nbdev-export rewrites
# pyproject.toml in place, so modification times would trigger needless reinstalls).
venv:
	@h=$$(cat pyproject.toml $(CONSTRAINTS) | md5sum); \
	if [ ! -x $(BIN)/python ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$$h" ]; then \
	  set -e; test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  if [ -n "$(TORCH_INDEX)" ]; then $(PIP) install --quiet --index-url $(TORCH_INDEX) $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) torch; fi; \
	  echo "installing robustbench_lab[dev] into $(VENV)"; \
	  $(PIP) install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]" > $(VENV)/install.log 2>&1 \
	    || { tail -40 $(VENV)/install.log; echo "pip install failed; full log in $(VENV)/install.log"; exit 1; }; \
	  $(BIN)/python -c "import robustbench_lab, torch, papermill, pyautoattack" ; \
	  echo "$$h" > $(STAMP); \
	fi

DEMO_DIR ?= runs/demo
demo: venv
	@mkdir -p $(DEMO_DIR)
	$(BIN)/papermill --cwd nbs nbs/01_data.ipynb $(DEMO_DIR)/01_data.ipynb
	$(BIN)/papermill --cwd nbs nbs/02_models.ipynb $(DEMO_DIR)/02_models.ipynb
	$(BIN)/python -c "from robustbench_lab.data import load_arrays; from robustbench_lab.models import create_model, count_parameters; \
	x, y = load_arrays('digits', 'test'); m = create_model('small_cnn', 'digits'); \
	r = f'digits test: {tuple(x.shape)} uint8, {len(set(y.tolist()))} classes; small_cnn: {count_parameters(m):,d} parameters, logits {tuple(m(x[:2].float()/255).shape)}'; \
	open('$(DEMO_DIR)/report.txt', 'w').write(r + '\n'); print(r)"
	@echo "demo: executed notebooks and report in $(DEMO_DIR)/"

# The library must be exactly what the notebooks export: export, and fail if that changed anything.
sync-check: venv
	@before=$$(find robustbench_lab -name '*.py' | sort | xargs md5sum | md5sum); \
	$(BIN)/nbdev-export; \
	after=$$(find robustbench_lab -name '*.py' | sort | xargs md5sum | md5sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "robustbench_lab/ was out of sync with nbs/: nbdev-export rewrote it (review and commit the result)."; \
	  git status --short -- robustbench_lab 2>/dev/null; exit 1; \
	fi; echo "robustbench_lab/ matches the notebooks."

nbtest: venv
	$(BIN)/nbdev-test --n-workers $(NBDEV_WORKERS) --timing

pytest: venv
	$(BIN)/python -m pytest -q --durations=15 tests

# pytest runs last so that its summary line ends the output
test: venv
	$(MAKE) --no-print-directory sync-check
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory pytest

lab: venv
	$(BIN)/jupyter lab

export: venv
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
