# make install   create .venv and install everything from requirements.txt
# make demo      run the main job on the embedded default (see README)
# make test      run the test suite (CPU, offline)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(BIN)/activate

install: $(BIN)/activate

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

.PHONY: install test demo
