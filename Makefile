# llama-forge: every target creates/reuses the virtualenv in .venv.
# `make engine` builds the default model; `make test` runs the suite. See README.md for all targets.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
PY          := $(BIN)/python
MODEL       ?= demo-tiny
CHECKPOINT  ?=
PRECISION   ?= fp32
BACKEND     ?= ort
WEIGHTS     ?= checkpoint
OUT         ?= engines/$(MODEL)
PROMPT      ?= def main(
MAX_NEW_TOKENS ?= 32
DUMP_AFTER  ?=
PYTEST_ARGS ?=

# The demo model needs no download: its checkpoint is generated on first use.
ifeq ($(MODEL)$(CHECKPOINT),demo-tiny)
CHECKPOINT := checkpoints/demo-tiny
DEMO_DEP   := checkpoints/demo-tiny/config.json
endif

.PHONY: venv engine export generate variants passes test lint bench-export clean help

help:
	@sed -n 's/^## //p' README.md | head -40 || true
	@echo "targets: venv engine export generate variants passes test lint bench-export clean"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing later can resolve it to a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# Type stubs for the TensorRT builder's mypy check: installed without deps so they never pull TensorRT.
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $@

venv: $(VENV)/.installed

checkpoints/demo-tiny/config.json: | $(VENV)/.installed
	$(BIN)/llamaforge demo-checkpoint checkpoints/demo-tiny

## make engine [MODEL=demo-tiny] [CHECKPOINT=dir] [PRECISION=fp32|fp16|bf16] [BACKEND=ort|trt] [WEIGHTS=checkpoint|none] [OUT=dir] [DUMP_AFTER=pass]
engine: $(VENV)/.installed $(DEMO_DEP)
	$(BIN)/llamaforge build --model $(MODEL) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--precision $(PRECISION) --backend $(BACKEND) --weights $(WEIGHTS) --out $(OUT) \
		$(foreach p,$(DUMP_AFTER),--dump-after $(p))
	@if [ "$(WEIGHTS)" != "none" ] && [ "$(BACKEND)" = "ort" ]; then \
		echo "sample (greedy, $(MAX_NEW_TOKENS) tokens):"; \
		$(BIN)/llamaforge generate $(OUT) "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS); fi

## make export MODEL=... [CHECKPOINT=dir] OUT=file.onnx: the traced graph with the plugin op, before any pass
export: $(VENV)/.installed $(DEMO_DEP)
	$(BIN)/llamaforge export --model $(MODEL) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--precision $(PRECISION) --out $(if $(filter engines/%,$(OUT)),exported/$(MODEL).onnx,$(OUT))

## make generate [ENGINE=engines/demo-tiny] [PROMPT=...]
ENGINE ?= engines/$(MODEL)
generate: $(VENV)/.installed
	$(BIN)/llamaforge generate $(ENGINE) "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS)

## make variants: the registry with parameter counts
variants: $(VENV)/.installed
	$(BIN)/llamaforge variants

passes: $(VENV)/.installed
	$(BIN)/llamaforge passes

## make test: the default suite (CPU, ~minutes)
test: $(VENV)/.installed
	$(BIN)/pytest -q $(PYTEST_ARGS)

## make bench-export: export a random llama3.2-3b-shaped checkpoint, report wall time and peak RSS
bench-export: $(VENV)/.installed
	$(PY) bench/export_memory.py

clean:
	rm -rf engines exported checkpoints/demo-tiny .pytest_cache
