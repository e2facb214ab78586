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
	  $(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name python3 > /dev/null; \
	  echo "$$h" > $(STAMP); \
	fi

# The main job, offline: PGD-AT and TRADES on the embedded 8x8 digits (small_cnn, 10 epochs each),
# each run leaving its executed notebook, metrics, checkpoints and report in runs/demo-<objective>/.
DEMO_EPOCHS ?= 10
demo: venv
	@rm -rf runs/demo-pgdat runs/demo-trades
	$(BIN)/rblab-run nbs/train.ipynb -p objective pgdat -p epochs $(DEMO_EPOCHS) -p run_name demo-pgdat -p progress False
	$(BIN)/rblab-run nbs/train.ipynb -p objective trades -p epochs $(DEMO_EPOCHS) -p run_name demo-trades -p progress False
	@$(BIN)/python -c "from robustbench_lab.evaluate import Report; [print(Report.load(f'runs/demo-{o}/report.json'), end='\n\n') for o in ('pgdat', 'trades')]"
	@echo "demo: runs/demo-pgdat/ and runs/demo-trades/ hold the executed notebooks (train.ipynb), metrics, checkpoints and reports"

# The library must be exactly what the notebooks export: export, and fail if that changed anything.
sync-check: venv
	@before=$$(find robustbench_lab -name '*.py' | sort | xargs md5sum | md5sum); \
	$(BIN)/nbdev-export; \
	after=$$(find robustbench_lab -name '*.py' | sort | xargs md5sum | md5sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "robustbench_lab/ was out of sync with nbs/: nbdev-export rewrote it (review and commit the result)."; \
	  git status --short -- robustbench_lab 2>/dev/null; exit 1; \
	fi; echo "robustbench_lab/ matches the notebooks."

# one intra-op thread per notebook worker: two workers with two threads each on two cores spin against each other.
# The notebooks' runs (the pipelines' and the figure notebooks' tiny stand-ins) go to .test-runs/, never to runs/:
# a figure notebook under test must not pick up a researcher's real CIFAR runs (hours of evaluation) by name.
nbtest: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} RBLAB_RUNS=$(CURDIR)/.test-runs $(BIN)/nbdev-test --n-workers $(NBDEV_WORKERS) --timing

pytest: venv
	$(BIN)/python -m pytest -q --durations=15 tests

# pytest runs last so that its summary line ends the output
test: venv
	$(MAKE) --no-print-directory sync-check
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory pytest

# .jupyter/ holds the clean-on-save hook: saving a notebook under nbs/ never writes outputs, execution counts or
# another Python's kernel metadata into it. The kernelspec installed above is named as nbdev-clean writes it.
lab: venv
	JUPYTER_CONFIG_PATH=$(CURDIR)/.jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH} $(BIN)/jupyter lab

export: venv
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
