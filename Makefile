# `make demo`: install, then prepare -> train -> sample on the embedded corpus. `make test`: install, run the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/gptkit prepare --corpus python --tokenizer bpe --vocab-size 4096 --out data/python-bpe4096
	rm -rf runs/demo
	$(BIN)/gptkit train --data data/python-bpe4096 --out runs/demo --time-limit 120 \
		block_size=128 lr=3e-3 optimizer=muon warmup_steps=30 schedule=wsd eval_interval=100
	$(BIN)/gptkit generate runs/demo --prompt "def " --max-new-tokens 120 --temperature 0.8 --seed 0

test: install
	$(BIN)/python -m pytest -q
