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
PORT        ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

# The demo model needs no download: its checkpoint is generated on first use.
ifeq ($(MODEL)$(CHECKPOINT),demo-tiny)
CHECKPOINT := checkpoints/demo-tiny
DEMO_DEP   := checkpoints/demo-tiny/config.json
endif
# demo-tiny is not a released model, so it is not in the registry: its checkpoint alone defines it.
MODEL_ARG := $(if $(filter demo-tiny,$(MODEL)),,--model $(MODEL))

.PHONY: venv engine export generate serve variants passes test bench-export bench-attention bench-kernels bench-serve clean help

## make help: this list
help:
	@grep -E '^## ' Makefile | sed 's/^## //'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so nothing later can resolve it to a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# Type stubs for the TensorRT builder's mypy check: installed without deps so they never pull TensorRT.
	$(BIN)/pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $@

## make venv: create/refresh the virtualenv (.venv) from pyproject.toml
venv: $(VENV)/.installed

checkpoints/demo-tiny/config.json: | $(VENV)/.installed
	$(BIN)/llamaforge demo-checkpoint checkpoints/demo-tiny

## make engine [MODEL=demo-tiny] [CHECKPOINT=dir] [PRECISION=fp32|fp16|bf16] [BACKEND=ort|trt] [WEIGHTS=checkpoint|none] [OUT=dir] [DUMP_AFTER=pass]
engine: $(VENV)/.installed $(DEMO_DEP)
	$(BIN)/llamaforge build $(MODEL_ARG) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--precision $(PRECISION) --backend $(BACKEND) --weights $(WEIGHTS) --out $(OUT) \
		$(foreach p,$(DUMP_AFTER),--dump-after $(p))
	@if [ "$(WEIGHTS)" != "none" ] && [ "$(BACKEND)" = "ort" ]; then \
		echo "sample (greedy, $(MAX_NEW_TOKENS) tokens):"; \
		$(BIN)/llamaforge generate $(OUT) "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS); fi

## make export MODEL=... [CHECKPOINT=dir] OUT=file.onnx: the traced graph with the plugin op, before any pass
export: $(VENV)/.installed $(DEMO_DEP)
	$(BIN)/llamaforge export $(MODEL_ARG) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--precision $(PRECISION) --out $(if $(filter engines/%,$(OUT)),exported/$(MODEL).onnx,$(OUT))

## make generate [ENGINE=engines/demo-tiny] [PROMPT=...]
ENGINE ?= engines/$(MODEL)
generate: $(VENV)/.installed
	$(BIN)/llamaforge generate $(ENGINE) "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS)

## make serve [ENGINE=engines/demo-tiny] [PORT=8001] [METRICS_PORT=8002]: Triton-protocol gRPC server (+ /metrics)
serve: $(VENV)/.installed
	$(BIN)/llamaforge serve $(ENGINE) --port $(PORT) --metrics-port $(METRICS_PORT)

## make variants: the registry with parameter counts
variants: $(VENV)/.installed
	$(BIN)/llamaforge variants

## make passes: the pass pipeline of each backend
passes: $(VENV)/.installed
	$(BIN)/llamaforge passes

## make test: the default suite (CPU, ~minutes)
test: $(VENV)/.installed
	$(BIN)/pytest -q $(PYTEST_ARGS)

## make bench-export: export a random llama3.2-3b-shaped checkpoint, report wall time and peak RSS
bench-export: $(VENV)/.installed
	$(PY) bench/export_memory.py

## make bench-attention: time the two ORT lowerings of the attention op (decomposed vs GroupQueryAttention)
bench-attention: $(VENV)/.installed
	$(PY) bench/attention_lowering.py

## make bench-kernels: Triton attention kernels on a CUDA GPU: decode HBM bandwidth vs peak, prefill TFLOP/s vs SDPA
bench-kernels: $(VENV)/.installed
	$(PY) bench/kernels.py

# The peer of bench-serve (onnxruntime-genai) is an optional extra, installed here only.
$(VENV)/.bench-installed: pyproject.toml | $(VENV)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

## make bench-serve: in-flight vs static batching vs onnxruntime-genai over gRPC (tok/s, TTFT, ITL), single-stream decode vs roofline
bench-serve: $(VENV)/.installed $(VENV)/.bench-installed
	$(PY) bench/serve.py

## make clean: remove engines, exported graphs and the demo checkpoint
clean:
	rm -rf engines exported checkpoints/demo-tiny .pytest_cache
