# llama-forge: every target creates/reuses the virtualenv in .venv.
# `make engine` builds the default model; `make test` runs the suite. `make help` lists every target.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
PY          := $(BIN)/python
MODEL       ?= stdlib-5m
CHECKPOINT  ?=
PRECISION   ?= fp32
BACKEND     ?= ort
WEIGHTS     ?= checkpoint
# TP=N: a tensor-parallel engine of N rank graphs (docs/tensor_parallel.md)
TP          ?= 1
OUT         ?= engines/$(MODEL)
PROMPT      ?= def main(
MAX_NEW_TOKENS ?= 32
DUMP_AFTER  ?=
KV_CACHE    ?=
CALIB       ?=
PORT        ?= 8001
METRICS_PORT ?= 8002
HTTP_PORT   ?= 8000
# serve / repo: DECOUPLED=false deploys the models non-decoupled (one response per request, no streaming)
DECOUPLED   ?= true
DECOUPLED_ARG = $(if $(filter false False FALSE 0 no,$(DECOUPLED)),--no-decoupled,--decoupled)
PYTEST_ARGS ?=
# BACKEND=trt: engine limits and build settings (docs/tensorrt.md); empty = the CLI's defaults
# (MAX_BATCH 8, MAX_INPUT_LEN 512, MAX_KV_TOKENS 2048, timing cache OUT/timing.cache).
MAX_BATCH     ?=
MAX_INPUT_LEN ?=
MAX_KV_TOKENS ?=
TIMING_CACHE  ?=
TRT_ARGS := $(if $(MAX_BATCH),--max-batch $(MAX_BATCH)) $(if $(MAX_INPUT_LEN),--max-input-len $(MAX_INPUT_LEN)) \
	$(if $(MAX_KV_TOKENS),--max-kv-tokens $(MAX_KV_TOKENS)) $(if $(TIMING_CACHE),--timing-cache $(TIMING_CACHE))

# The default model, stdlib-5m, is a small trained checkpoint committed to the repo (make demo-model
# retrains it). demo-tiny (random weights) needs no download either: it is generated on first use.
ifeq ($(MODEL)$(CHECKPOINT),stdlib-5m)
CHECKPOINT := checkpoints/stdlib-5m
endif
ifeq ($(MODEL)$(CHECKPOINT),demo-tiny)
CHECKPOINT := checkpoints/demo-tiny
DEMO_DEP   := checkpoints/demo-tiny/config.json
endif
# The demo models are not released models, so they are not in the registry: the checkpoint alone defines them.
MODEL_ARG := $(if $(filter demo-tiny stdlib-5m,$(MODEL)),,--model $(MODEL))

.PHONY: venv engine export demo-model demo-copy-model generate serve compare-trt repo variants passes test bench-export bench-attention bench-kernels bench-serve bench-kv bench-quant bench-quant-speed bench-moe bench-moe-quant bench-triton-tools bench-openai bench-guided bench-tp bench-prefix bench-spec bench-sampling lint clean help

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

## make engine [MODEL=stdlib-5m] [CHECKPOINT=dir] [PRECISION=fp32|fp16|bf16|fp8|int8-sq|int8-wo|int4-awq|int4-rtn] [KV_CACHE=fp8] [CALIB=file-or-dir] [BACKEND=ort|trt] [WEIGHTS=checkpoint|none] [TP=1] [OUT=dir] [DUMP_AFTER=pass]
engine: $(VENV)/.installed $(DEMO_DEP)
	$(BIN)/llamaforge build $(MODEL_ARG) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--precision $(PRECISION) --backend $(BACKEND) --weights $(WEIGHTS) --tp $(TP) --out $(OUT) \
		$(foreach p,$(DUMP_AFTER),--dump-after $(p)) $(TRT_ARGS) \
		$(if $(KV_CACHE),--kv-cache $(KV_CACHE)) $(if $(CALIB),--calib "$(CALIB)")
	@if [ "$(WEIGHTS)" != "none" ] && [ "$(BACKEND)" = "ort" ] && [ "$(TP)" = "1" ]; then \
		echo "sample (greedy, $(MAX_NEW_TOKENS) tokens):"; \
		$(BIN)/llamaforge generate $(OUT) "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS); fi

## make export MODEL=... [CHECKPOINT=dir] OUT=file.onnx: the traced graph with the plugin op, before any pass
export: $(VENV)/.installed $(DEMO_DEP)
	$(BIN)/llamaforge export $(MODEL_ARG) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		--precision $(PRECISION) --out $(if $(filter engines/%,$(OUT)),exported/$(MODEL).onnx,$(OUT))

## make generate [ENGINE=engines/MODEL] [PROMPT=...]
ENGINE ?= engines/$(MODEL)
generate: $(VENV)/.installed
	$(BIN)/llamaforge generate $(ENGINE) "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS)

# serve: HOST is the bind address of every port, taken from make's command line only (some shells export
# HOST as the machine's name); TLS_CERT + TLS_KEY turn on TLS; the API key comes only from the environment
# (LLAMAFORGE_API_KEY=... make serve), so make's echo of the command never shows it.
SERVE_HOST    := $(if $(filter command line,$(origin HOST)),$(HOST),127.0.0.1)
TLS_CERT      ?=
TLS_KEY       ?=
DRAIN_TIMEOUT ?= 30

## make serve [ENGINE=engines/MODEL] [HOST=127.0.0.1] [PORT=8001] [HTTP_PORT=8000] [METRICS_PORT=8002] [DECOUPLED=true|false] [TLS_CERT=pem TLS_KEY=pem] [DRAIN_TIMEOUT=30] [SERVE_ARGS="--speculative ngram ..."] (API key: LLAMAFORGE_API_KEY in the environment): Triton-protocol gRPC server, OpenAI-compatible HTTP (HTTP_PORT=-1: none) (+ /metrics; docs/serving.md)
serve: $(VENV)/.installed
	$(BIN)/llamaforge serve $(ENGINE) --host $(SERVE_HOST) --port $(PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) $(DECOUPLED_ARG) \
		$(if $(TLS_CERT),--tls-cert $(TLS_CERT)) $(if $(TLS_KEY),--tls-key $(TLS_KEY)) --drain-timeout $(DRAIN_TIMEOUT) $(SERVE_ARGS)

NAME        ?=
DEVICE      ?= gpu
GPUS        ?= 0
ENGINE_PATH ?=
# OUT defaults to the engine directory for `make engine`; for `make repo` only an OUT given by the user counts.
REPO_OUT    := $(if $(filter command line environment,$(origin OUT)),$(OUT))

## make repo ENGINE=dir [NAME=variant] [OUT=triton_repo/NAME] [DEVICE=gpu|cpu] [GPUS=0,1] [ENGINE_PATH=dir as the server sees it] [DECOUPLED=true|false] [REPO_ARGS="--speculative ngram ..."]: Triton model repository (triton_repo/README.md)
repo: $(VENV)/.installed
	$(BIN)/llamaforge repo $(ENGINE) $(if $(NAME),--name $(NAME)) $(if $(REPO_OUT),--out $(REPO_OUT)) \
		--device $(DEVICE) --gpus $(GPUS) $(if $(ENGINE_PATH),--engine-path $(ENGINE_PATH)) $(DECOUPLED_ARG) $(REPO_ARGS)

## make demo-model: retrain the default model (checkpoints/stdlib-5m) on this Python's stdlib sources (~15-20 min, 2 cores)
demo-model: $(VENV)/.installed
	$(BIN)/llamaforge train-demo --out checkpoints/stdlib-5m

## make demo-copy-model: fine-tune stdlib-5m to copy what its prompt holds (checkpoints/stdlib-5m-copy, bench-spec's model; ~30 min, 2 cores)
demo-copy-model: $(VENV)/.installed
	$(PY) -m llamaforge.export.demo.copy_tune --base checkpoints/stdlib-5m --out checkpoints/stdlib-5m-copy

## make compare-trt [ENGINE=engines/MODEL] [ORT_ENGINE=ENGINE.ort]: polygraphy, TensorRT plan vs ONNX Runtime on the same inputs (GPU + TensorRT)
ORT_ENGINE  ?= $(ENGINE).ort
COMPARE_TOL ?= --atol 1e-2 --rtol 1e-2
compare-trt: $(VENV)/.installed
	@$(PY) -c "import sys, tensorrt; sys.exit(0 if hasattr(tensorrt, 'Builder') else 1)" 2>/dev/null || \
		{ echo "compare-trt needs NVIDIA TensorRT (tensorrt.Builder): pip install '.[tensorrt]' on a machine with a GPU" >&2; exit 2; }
	LLAMAFORGE_ENGINE=$(ORT_ENGINE) $(BIN)/polygraphy run $(ORT_ENGINE)/model.onnx --onnxrt \
		--data-loader-script llamaforge/build/compare_data.py --save-outputs $(ENGINE).ort-outputs.json
	LLAMAFORGE_ENGINE=$(ENGINE) $(BIN)/polygraphy run $(ENGINE)/engine.plan --model-type engine --trt \
		--data-loader-script llamaforge/build/compare_data.py --load-outputs $(ENGINE).ort-outputs.json $(COMPARE_TOL)

## make variants: the registry with parameter counts
variants: $(VENV)/.installed
	$(BIN)/llamaforge variants

## make passes: the pass pipeline of each backend
passes: $(VENV)/.installed
	$(BIN)/llamaforge passes

# mypy cannot follow setuptools' editable import hook, so it reads the package through a tree of
# links laid out as the install maps it (tests/helpers/typecheck.py).
TYPECHECK_TREE := $(VENV)/typecheck
STAGE_DIRS     := export graphs plugins runtime triton_repo

## make lint: ruff over the sources, tests and benches; mypy over the whole llamaforge package
lint: $(VENV)/.installed
	$(BIN)/ruff check llamaforge $(STAGE_DIRS) tests bench
	$(PY) tests/helpers/typecheck.py $(TYPECHECK_TREE) >/dev/null
	cd $(TYPECHECK_TREE) && MYPYPATH=stubs "$(CURDIR)/$(PY)" -m mypy --config-file "$(CURDIR)/pyproject.toml" -p llamaforge

## make test: lint, then the default suite (CPU, ~minutes)
test: lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

## make bench-export: export a random llama3.2-3b-shaped checkpoint, report wall time and peak RSS
bench-export: $(VENV)/.installed
	$(PY) bench/export_memory.py

## make bench-attention: time the two ORT lowerings of the attention op (decomposed vs GroupQueryAttention)
bench-attention: $(VENV)/.installed
	$(PY) bench/attention_lowering.py

## make bench-quant: perplexity and top-1 vs fp32 of fp8/int8-sq/int8-wo/int4-awq/int4-rtn on stdlib-5m and its outlier variant, in- and out-of-domain calibration (bench/quant.py), then bench-quant-speed
bench-quant: $(VENV)/.installed $(VENV)/.bench-installed
	$(PY) bench/quant.py; quality=$$?; $(PY) bench/quant_speed.py; speed=$$?; test $$quality -eq 0 && test $$speed -eq 0

## make bench-quant-speed: single-stream decode of our fp32/int8/int4 engines vs onnxruntime-genai fp32/int8/int4 and llama.cpp f32/q8_0/q4_0 (built once under bench/.work/quant-peers), copy-bandwidth roofline, bytes
bench-quant-speed: $(VENV)/.installed $(VENV)/.bench-installed
	$(PY) bench/quant_speed.py

## make bench-moe: MoE decode ms/token as experts grow 16->128 at top-1 (active-expert Loop vs every-expert peer)
bench-moe: $(VENV)/.installed
	$(PY) bench/moe.py

## make bench-moe-quant: quantized MoE experts (int8-wo, fp8; router fp32) vs fp32: logit KL, top-1 agreement
bench-moe-quant: $(VENV)/.installed
	$(PY) bench/moe.py --quality

## make bench-tp: tensor parallelism's overhead on this CPU: decode tok/s TP=2 (1 thread per rank, mpiexec) vs TP=1 (2 threads) on the 125M bench model; the all-reduce's share of a step and bytes per token vs 2 x layers x hidden x 4
bench-tp: $(VENV)/.installed
	$(PY) bench/tp.py

## make bench-kv: KV cache layout: sequences a budget holds (blocks vs slots), block bookkeeping cost, in-place decode vs copy [ENGINE=engines/MODEL]
bench-kv: $(VENV)/.installed
	$(PY) bench/kv_layout.py $(ENGINE)

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

## make bench-prefix: prefix caching on vs off: a chat workload sharing a 1,024-token system prompt (TTFT p50/p99, tok/s, prefill tokens saved) and one sharing nothing (overhead)
bench-prefix: $(VENV)/.installed
	$(PY) bench/prefix.py

## make bench-spec: speculative decoding (prompt lookup) on vs off on the trained stdlib-5m-copy: an editing workload and a no-repeat one, 1 and 8 streams (tok/s, acceptance), and the verify call's cost
bench-spec: $(VENV)/.installed
	$(PY) bench/spec.py

## make bench-sampling: the host cost of one token's pick from one row of logits at vocab 32000 and 128256 (greedy, log probs, temperature, top_p) against the same steps in plain NumPy, with and without the core's malloc thresholds
bench-sampling: $(VENV)/.installed
	$(PY) bench/sampling.py

## make bench-openai: the OpenAI HTTP/SSE route under AIPerf (pinned, own venv in bench/.work) vs the same load over gRPC streaming, concurrency 1-16: tok/s, TTFT, ITL (target HTTP >= 0.95x gRPC)
bench-openai: $(VENV)/.installed
	$(PY) bench/openai_load.py

## make bench-guided: guided decoding: llguidance vs xgrammar mask cost per token at vocab 32k / 128k (xgrammar in a throwaway venv under bench/.work), then the per-step overhead at 1 and 16 rows on the 125M bench model (target <= 10% at 16 rows)
bench-guided: $(VENV)/.installed
	$(PY) bench/guided.py

## make bench-triton-tools: NVIDIA perf_analyzer 2.60 and genai-perf 0.0.16 (pinned, own venv + Debian 13 glibc under bench/.work/triton-tools), stock commands vs llamaforge serve: throughput, latency
bench-triton-tools: $(VENV)/.installed
	$(PY) bench/triton_tools.py

## make clean: remove engines, exported graphs and the demo checkpoint
clean:
	rm -rf engines exported checkpoints/demo-tiny .pytest_cache
