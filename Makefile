# medssl: the two commands of the README's quick start, each doing its own set-up.
#   make demo   synthetic cine CMR cohort -> cine MAE pre-training -> few-label segmentation fine-tuning -> Dice, LVEF error
#   make test   run the test suite
# The install steps below are mirrored by docker/Dockerfile and docker/Dockerfile.cuda
# (tests/test_install.py keeps them in step).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_REQUIREMENT := torch==2.13.0
# Where torch comes from: empty = pip's configured index (here a local CPU build); the Dockerfiles set it.
TORCH_INDEX ?=
RUN_DIR ?= runs/demo

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_REQUIREMENT)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[all]"
	touch $@

demo: install
	$(VENV)/bin/medssl demo --run-dir $(RUN_DIR)

test: install
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache
