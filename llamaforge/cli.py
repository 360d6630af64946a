"""`llamaforge`: the command line under the Makefile. Subcommands mirror the make targets.

  llamaforge variants                      make variants
  llamaforge export  --model M ...         (traced ONNX with the plugin op, before any pass)
  llamaforge build   --model M ...         make engine
  llamaforge generate ENGINE PROMPT...     make generate (--chat: through the chat template)
  llamaforge passes                        the pass pipelines per backend
  llamaforge demo-checkpoint DIR           a random-weight tiny checkpoint (no training)
  llamaforge train-demo [--out DIR]        make demo-model (trains the default model, stdlib-5m)
  llamaforge demo-outliers [--out DIR]     stdlib-5m with activation outliers (export/demo/outliers.py)
  llamaforge serve ENGINE [--port ...]     make serve (Triton-protocol gRPC server + /metrics)
  llamaforge repo ENGINE [--name ...]      make repo (Triton model repository, triton_repo/README.md)

Each command imports its stage inside its function: `serve` and `generate` run on hosts without
the build stage's dependencies (torch, onnx), and every command would pay for every stage's imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamaforge.build.trt_backend import TensorRTOptions
    from llamaforge.runtime.core.config import CoreConfig


def _weights(value: str) -> bool:
    if value not in ("checkpoint", "none"):
        raise argparse.ArgumentTypeError("WEIGHTS must be 'checkpoint' or 'none'")
    return value == "checkpoint"


def cmd_variants(args: argparse.Namespace) -> None:
    from llamaforge.export.variants import format_table

    print(format_table())


def cmd_passes(args: argparse.Namespace) -> None:
    from llamaforge.graphs.pipeline import PASSES, PIPELINES, QUANT_PASSES, pipeline
    from llamaforge.graphs.quantization.recipes import QUANT_PRECISIONS, QuantConfig

    for backend, names in PIPELINES.items():
        print(f"{backend}: {' -> '.join(names)}")
    for precision in QUANT_PRECISIONS:
        print(f"ort {precision}: {' -> '.join(pipeline('ort', QuantConfig(precision)))}")
    print(f"ort KV_CACHE=fp8: {' -> '.join(pipeline('ort', QuantConfig(kv_cache='fp8')))}")
    print("passes:", ", ".join(sorted([*PASSES, *QUANT_PASSES])))


def cmd_export(args: argparse.Namespace) -> None:
    import onnx

    from llamaforge.export.exporter import export_model, model_source, save_streaming, tqdm_progress
    from llamaforge.graphs.verify import skeleton_proto

    ckpt, config = model_source(args.model, Path(args.checkpoint) if args.checkpoint else None)
    model = export_model(config, args.precision, ckpt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        # Graph only: weights become graph inputs, so nothing the size of the model is written.
        onnx.save(skeleton_proto(model), str(out))
    else:
        save_streaming(model, out, tqdm_progress("write weights"))
    print(f"exported: {out}")


def cmd_build(args: argparse.Namespace) -> None:
    from llamaforge.build.builder import BuildOptions, build_engine

    build_engine(BuildOptions(
        model=args.model, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        out=Path(args.out) if args.out else None, precision=args.precision, backend=args.backend,
        weights=args.weights, dump_after=args.dump_after, dump_dir=Path(args.dump_dir) if args.dump_dir else None,
        kv_cache=args.kv_cache, calib=Path(args.calib) if args.calib else None,
        smoothquant_alpha=args.smoothquant_alpha, quantize_lm_head=args.quantize_lm_head,
        int8_activation=args.int8_activation,
        # fp8 scale options left unset take BuildOptions' defaults (recipes.py's measured ones)
        **{k: getattr(args, k) for k in ("fp8_activation_scale", "fp8_weight_scale", "fp8_weights")
           if getattr(args, k) is not None},
        int4_block_size=args.int4_block_size, ort_kernels=args.ort_kernels,
        tensorrt=_tensorrt_options(args), tp=args.tp,
    ))


def _tensorrt_options(args: argparse.Namespace) -> TensorRTOptions:
    from llamaforge.build.trt_backend import ProfileLimits, TensorRTOptions

    return TensorRTOptions(
        limits=ProfileLimits(args.max_batch, args.max_input_len, args.max_kv_tokens),
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        workspace_bytes=int(args.trt_workspace_gib * (1 << 30)) if args.trt_workspace_gib else None,
        optimization_level=args.trt_opt_level, verbose=args.trt_verbose)


_CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython")  # "ROLE: text" prefixes --chat recognises


def _chat_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    """`--chat`: the conversation from `--messages FILE` (a JSON list of {"role", "content"}; "-"
    is stdin) or from --chat's arguments, each "ROLE: text" or plain text (a user message)."""
    import json

    if args.messages:
        try:
            text = sys.stdin.read() if args.messages == "-" else Path(args.messages).read_text(encoding="utf-8")
            messages = json.loads(text)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--messages {args.messages}: {e}") from None
        if not isinstance(messages, list):
            raise SystemExit(f"--messages {args.messages}: expected a JSON list of {{\"role\", \"content\"}} objects")
        return messages
    out = []
    for arg in args.chat:
        role, sep, content = arg.partition(":")
        if sep and role.strip() in _CHAT_ROLES:
            out.append({"role": role.strip(), "content": content.lstrip(" ")})
        else:
            out.append({"role": "user", "content": arg})
    return out


def cmd_generate(args: argparse.Namespace) -> None:
    from llamaforge.runtime.core.chat_template import ChatTemplateError
    from llamaforge.runtime.core.engine import Engine, read_manifest
    from llamaforge.runtime.core.generate import generate_chat, generate_text
    from llamaforge.runtime.core.sampling import SamplingParams

    chat = args.chat is not None
    if args.messages and not chat:
        raise SystemExit("--messages needs --chat")
    if chat and args.prompt:
        raise SystemExit("generate --chat: the messages follow --chat (or come from --messages FILE); no PROMPT too")
    if not (args.prompt or args.messages or args.chat):
        raise SystemExit("generate: give a PROMPT (or --chat MESSAGE..., or --chat --messages FILE)")
    if read_manifest(args.engine).vision is not None:
        _generate_with_images(args)
        return
    if args.image:
        raise SystemExit(f"generate --image: {args.engine} is not a Llama 3.2 Vision engine")
    engine = Engine(args.engine)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)
    if chat:
        try:
            print(generate_chat(engine, _chat_messages(args), args.max_new_tokens, params))
        except ChatTemplateError as e:
            raise SystemExit(f"generate --chat: {e}") from None
        return
    texts = generate_text(engine, args.prompt, args.max_new_tokens, params, allow_special=args.special_tokens)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
        print("-" * 40)


def _generate_with_images(args: argparse.Namespace) -> None:
    """`generate` on a Llama 3.2 Vision engine: one PROMPT with an `<|image|>` token where each `--image`
    goes (none: a text-only prompt), through the engine core (runtime/core/mllama_engine.py; docs/vision.md)."""
    from llamaforge.runtime.core.mllama_engine import MllamaEngine
    from llamaforge.runtime.core.mllama_image import ImageInput
    from llamaforge.runtime.core.requests import RequestError
    from llamaforge.runtime.core.sampling import SamplingParams

    if args.chat is not None or len(args.prompt) != 1:
        raise SystemExit("generate on a Llama 3.2 Vision engine: exactly one PROMPT (no --chat yet)")
    engine = MllamaEngine(args.engine, max_images=max(1, len(args.image)))
    try:
        if engine.tokenizer is None:
            raise SystemExit(f"generate: {args.engine} has no tokenizer")
        ids = engine.tokenizer.encode(args.prompt[0], allow_special=True)  # <|image|> is a special token
        marks = ids.count(engine.vision.image_token_id)
        if marks != len(args.image):
            raise SystemExit(f"generate: the prompt has {marks} <|image|> token(s) but {len(args.image)} --image file(s)")
        images = [ImageInput(f"--image {p}", Path(p).read_bytes()) for p in args.image]
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
        try:
            out = engine.generate(ids, images, args.max_new_tokens, params, stop_ids=engine.eos_ids)
        except RequestError as e:
            raise SystemExit(f"generate: {e}") from None
        print(f"{args.prompt[0]}{engine.tokenizer.decode(out)}")
    finally:
        engine.close()


def _core_config(args: argparse.Namespace) -> CoreConfig:
    """The engine core settings `serve` and `repo` share (`_add_core_arguments`)."""
    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig, SpeculativeConfig

    return CoreConfig(KVCacheConfig(budget_tokens=args.kv_budget_tokens, prefix_caching=args.prefix_caching),
                      SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.scheduling_policy),
                      max_queue=args.max_queue,
                      speculative=SpeculativeConfig(args.speculative, args.num_speculative_tokens, args.prompt_lookup_min,
                                                    args.prompt_lookup_max, args.draft_engine,
                                                    args.speculative_disable_by_batch_size))


def cmd_serve(args: argparse.Namespace) -> None:
    from llamaforge.runtime.serving.serve import serve

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {args.threads}")
    core_config = _core_config(args)
    if args.threads is not None:
        core_config = dataclasses.replace(core_config, threads=args.threads)
    serve(args.engine, host=args.host, port=args.port, metrics_port=None if args.metrics_port < 0 else args.metrics_port,
          core_config=core_config, max_message_bytes=args.max_message_mb * 1024 * 1024,
          decoupled=args.decoupled, http_port=None if args.http_port < 0 else args.http_port,
          tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, api_key=args.api_key,
          drain_timeout=args.drain_timeout, tp_timeout=args.tp_timeout)


def cmd_repo(args: argparse.Namespace) -> None:
    from llamaforge.triton_repo.repository import RepoOptions, write_repo

    gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip()) if args.gpus else ()
    write_repo(RepoOptions(
        engine=Path(args.engine), name=args.name, out=Path(args.out) if args.out else None,
        engine_path=args.engine_path, device=args.device, gpus=gpus, instances=args.instances,
        text_instances=args.text_instances, core=_core_config(args), decoupled=args.decoupled,
    ))


def cmd_demo_checkpoint(args: argparse.Namespace) -> None:
    from llamaforge.export.demo.tiny import make_demo_checkpoint

    make_demo_checkpoint(Path(args.dir))


def cmd_train_demo(args: argparse.Namespace) -> None:
    from llamaforge.export.demo.train import TrainOptions, train

    given = {"out": Path(args.out) if args.out else None, "steps": args.steps, "seed": args.seed}
    train(TrainOptions(**{k: v for k, v in given.items() if v is not None}))  # unset: TrainOptions' defaults


def cmd_demo_outliers(args: argparse.Namespace) -> None:
    from llamaforge.export.demo.outliers import DEFAULT_DIR, make_outlier_checkpoint
    from llamaforge.export.demo.train import DEFAULT_DIR as STDLIB_5M

    make_outlier_checkpoint(Path(args.out or DEFAULT_DIR), Path(args.source or STDLIB_5M), spikes=not args.no_spikes)


def _add_core_arguments(p: argparse.ArgumentParser, kv_budget: str, queue_full: str, policy: bool) -> None:
    """The engine core settings, defaulting to runtime/core/config.py's (read by `_core_config`);
    without `policy` the scheduling policy is the default one."""
    from llamaforge.runtime.core.config import (
        SCHEDULING_POLICIES,
        CoreConfig,
        KVCacheConfig,
        SchedulerConfig,
    )

    p.add_argument("--kv-budget-tokens", type=int, default=KVCacheConfig.budget_tokens, help=kv_budget)
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=KVCacheConfig.prefix_caching,
                   help="reuse the KV blocks of prompt prefixes seen before (automatic prefix caching; "
                        "TensorRT-LLM's enable_kv_cache_reuse); --no-prefix-caching turns it off")
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="sequences in the running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens,
                   help="tokens per engine step")
    p.add_argument("--max-queue", type=int, default=CoreConfig.max_queue, help=f"waiting requests before {queue_full}")
    _add_speculative_arguments(p)
    if policy:
        p.add_argument("--scheduling-policy", default=SchedulerConfig.policy, choices=SCHEDULING_POLICIES)
    else:
        p.set_defaults(scheduling_policy=SchedulerConfig.policy)


def _add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    from llamaforge.runtime.core.config import SPECULATIVE_METHODS, SpeculativeConfig

    p.add_argument("--speculative", default=SpeculativeConfig.method, choices=SPECULATIVE_METHODS,
                   help="speculative decoding: 'ngram' (prompt lookup in the sequence's own tokens) or 'draft' "
                        "(the greedy tokens of --draft-engine); default off")
    p.add_argument("--num-speculative-tokens", type=int, default=SpeculativeConfig.num_speculative_tokens,
                   help="most draft tokens a row verifies per step")
    p.add_argument("--prompt-lookup-min", type=int, default=SpeculativeConfig.prompt_lookup_min,
                   help="--speculative ngram: shortest n-gram matched")
    p.add_argument("--prompt-lookup-max", type=int, default=SpeculativeConfig.prompt_lookup_max,
                   help="--speculative ngram: longest n-gram matched")
    p.add_argument("--draft-engine", default=SpeculativeConfig.draft_engine,
                   help="--speculative draft: a smaller engine directory with the same tokenizer (repo: as the "
                        "Triton server sees it, absolute or relative to the repository's root)")
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=SpeculativeConfig.disable_by_batch_size,
                   help="no drafts in a step where this many sequences or more decode (0: never); the default "
                        "speculates only for a sequence decoding alone, where verifying is cheap on this backend")


def _add_decoupled_argument(p: argparse.ArgumentParser, models: str) -> None:
    """`--decoupled` / `--no-decoupled`, the deployment's transaction policy, shared by `serve` and `repo`."""
    p.add_argument("--decoupled", action=argparse.BooleanOptionalAction, default=True,
                   help=f"{models} decoupled: streaming, one response per new piece of text (default); "
                        "--no-decoupled: one response per request, unary ModelInfer for every model "
                        "(perf_analyzer / genai-perf without --streaming)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("variants", help="list registered variants with their parameter counts").set_defaults(fn=cmd_variants)
    sub.add_parser("passes", help="list pass pipelines").set_defaults(fn=cmd_passes)

    def model_args(sp: argparse.ArgumentParser, quantized: bool = False) -> None:
        sp.add_argument("--model", help="registered variant name (see `llamaforge variants`)")
        sp.add_argument("--checkpoint", help="HF or Meta checkpoint directory")
        sp.add_argument("--precision", default="fp32",
                        choices=["fp32", "fp16", "bf16",
                                 *(["fp8", "int8-sq", "int8-wo", "int4-awq", "int4-rtn"] if quantized else [])])

    e = sub.add_parser("export", help="trace a checkpoint to ONNX with the attention plugin op (no passes)")
    model_args(e)
    e.add_argument("--out", required=True, help="output .onnx path")
    e.set_defaults(fn=cmd_export)

    b = sub.add_parser("build", help="export + pass pipeline + engine directory (make engine)")
    model_args(b, quantized=True)
    b.add_argument("--backend", default="ort", help="ort | trt")
    b.add_argument("--weights", default=True, type=_weights, help="checkpoint (default) | none: graph only")
    b.add_argument("--out", help="engine directory (default engines/MODEL)")
    b.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: N rank graphs in OUT/rank0..N-1 (TP; docs/tensor_parallel.md)")
    b.add_argument("--dump-after", action="append", default=[], metavar="PASS", help="write the model after PASS")
    b.add_argument("--dump-dir", help="where --dump-after writes (default OUT.dump)")
    q = b.add_argument_group("quantization (--precision fp8|int8-sq|int8-wo|int4-awq|int4-rtn, --kv-cache fp8)")
    q.add_argument("--kv-cache", choices=["fp8"], help="FP8 E4M3 KV cache with per-layer K/V scales (KV_CACHE)")
    q.add_argument("--calib", help="calibration text: a UTF-8 file or a directory of them (CALIB; default: "
                                   "the demo model's held-out split)")
    q.add_argument("--smoothquant-alpha", type=float, default=None,
                   help="int8-sq, and int8-wo with --ort-kernels fast: force one SmoothQuant migration strength "
                        "in [0, 1] (default: searched per layer on the calibration data by the layer's output error)")
    q.add_argument("--int8-activation", choices=["per-token", "static"], default=None,
                   help="int8-sq activation scales: per-token (computed in the graph; the default on ort) or static "
                        "(one calibrated scale per tensor; the default and only form on trt)")
    # Unset, these take graphs/quantization/recipes.py's defaults, chosen by measurement
    # (docs/quantization.md#fp8-scales); importing it here would import the build stage.
    q.add_argument("--fp8-activation-scale", choices=["amax", "percentile", "mse"],
                   help="fp8 activation clip: calibrated amax, its 99.99th percentile, or searched by the layer's "
                        "output error")
    q.add_argument("--fp8-weight-scale", choices=["amax", "mse"],
                   help="fp8 weight clip: amax or searched by the weight's quantization error")
    q.add_argument("--fp8-weights", choices=["per-tensor", "per-channel"],
                   help="fp8 weight scales: per tensor (TensorRT's form) or per output channel (ort only)")
    q.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize lm_head too (default: yes for int8-wo, int4-* and per-token int8-sq with --ort-kernels "
                        "fast unless the embeddings are tied, no otherwise; docs/quantization.md)")
    q.add_argument("--int4-block-size", type=int, default=128, choices=[32, 64, 128],
                   help="int4-*: input channels per weight scale (default 128; a weight it does not divide takes "
                        "the largest smaller size that does)")
    q.add_argument("--ort-kernels", choices=["fast", "integer", "exact"], default="fast",
                   help="int8-wo / int8-sq / int4-*: ONNX Runtime kernels. fast (default): MatMulNBits with int8 "
                        "activations inside the kernel; integer: int8-sq's per-token codes through "
                        "MatMulIntegerToFloat; exact: the Q/DQ graph's own numbers (docs/quantization.md)")
    from llamaforge.build.trt_backend import ProfileLimits

    limits = ProfileLimits()
    trt = b.add_argument_group("TensorRT (--backend trt)")
    trt.add_argument("--max-batch", type=int, default=limits.max_batch,
                     help=f"rows per call, both profiles (MAX_BATCH, default {limits.max_batch})")
    trt.add_argument("--max-input-len", type=int, default=limits.max_input_len,
                     help=f"tokens per row in a context/prefill call (MAX_INPUT_LEN, default {limits.max_input_len})")
    trt.add_argument("--max-kv-tokens", type=int, default=limits.max_kv_tokens,
                     help=f"KV-cache capacity per row (MAX_KV_TOKENS, default {limits.max_kv_tokens})")
    trt.add_argument("--timing-cache", help="timing cache file to load and update (default: OUT/timing.cache, "
                                            "carried over from the engine being replaced)")
    trt.add_argument("--trt-workspace-gib", type=float, default=None, help="workspace memory-pool limit (GiB)")
    trt.add_argument("--trt-opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    trt.add_argument("--trt-verbose", action="store_true", help="TensorRT's verbose log")
    b.set_defaults(fn=cmd_build)

    g = sub.add_parser("generate", help="generate text from an engine directory")
    g.add_argument("engine")
    g.add_argument("prompt", nargs="*", help="prompts, each continued on its own")
    g.add_argument("--chat", nargs="*", metavar="MESSAGE", default=None,
                   help="one conversation through the engine's chat template (the checkpoint's chat_template); "
                   "prints the reply. Each MESSAGE is \"system: ...\", \"user: ...\", \"assistant: ...\" "
                   "or plain text (a user message)")
    g.add_argument("--messages", metavar="FILE", default=None,
                   help="with --chat: the conversation as a JSON list of {\"role\", \"content\"} (\"-\": stdin)")
    g.add_argument("--special-tokens", action="store_true",
                   help="special-token text in PROMPT (e.g. <|im_start|>) is the special token, not plain characters")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="Llama 3.2 Vision engines: an image for the next <|image|> token of PROMPT (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="serve an engine over Triton's gRPC protocol and OpenAI's HTTP API (make serve)")
    s.add_argument("engine")
    s.add_argument("--host", default="127.0.0.1",
                   help="address every port binds (gRPC, HTTP, metrics): default 127.0.0.1, this host only; "
                        "0.0.0.0 (or ::) for every interface")
    s.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001; 0: a free one)")
    s.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus /metrics port (default 8002; 0: a free one; -1: none)")
    s.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP port, with /v2/health (default 8000; 0: a free one; -1: none)")
    _add_core_arguments(s, kv_budget="KV cache size in tokens", queue_full="RESOURCE_EXHAUSTED (HTTP 429)",
                        policy=False)
    s.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: ONNX Runtime's own choice, one per physical core)")
    s.add_argument("--max-message-mb", type=int, default=64,
                   help="largest request message (gRPC) or body (HTTP, else 413) accepted")
    _add_decoupled_argument(s, "the models")
    s.add_argument("--tls-cert", metavar="FILE", help="serve gRPC and HTTP over TLS with this certificate chain "
                                                      "(PEM; needs --tls-key); /metrics stays plain HTTP")
    s.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM, unencrypted)")
    s.add_argument("--tls-client-ca", metavar="FILE",
                   help="also require client certificates signed by these CAs (PEM), on gRPC and HTTP (mutual TLS)")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on HTTP /v1/* (else 401) and the gRPC metadata "
                        "'authorization: Bearer KEY' (else UNAUTHENTICATED); health stays open. Default: "
                        "$LLAMAFORGE_API_KEY, which keeps the key out of `ps`")
    s.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT stop admitting (UNAVAILABLE / 503) and let the requests in flight "
                        "finish for up to this long, then cancel the rest and exit 0 (default 30)")
    s.add_argument("--tp-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a tensor-parallel engine (run under mpiexec -n N): how long a step's collective waits for "
                        "the other ranks before the engine is marked unavailable (default 30)")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("repo", help="a Triton model repository for an engine (make repo)")
    r.add_argument("engine")
    r.add_argument("--name", help="repository name (default: the engine's variant)")
    r.add_argument("--out", help="output directory (default triton_repo/NAME)")
    r.add_argument("--engine-path", help="the engine directory as the Triton server sees it (default: ENGINE, "
                                         "absolute); e.g. where `docker run -v` mounts it")
    r.add_argument("--device", default="gpu", choices=["gpu", "cpu"], help="llama's instance_group kind")
    r.add_argument("--gpus", default="0", help="GPU ids for KIND_GPU, comma-separated (default 0)")
    r.add_argument("--instances", type=int, default=1, help="llama instances per GPU (each its own batch and KV)")
    r.add_argument("--text-instances", type=int, default=1, help="CPU instances of preprocessing/postprocessing/bls")
    _add_core_arguments(r, kv_budget="KV cache size in tokens per llama instance", queue_full="UNAVAILABLE", policy=True)
    _add_decoupled_argument(r, "llama and bls")
    r.set_defaults(fn=cmd_repo)

    d = sub.add_parser("demo-checkpoint", help="write the default demo checkpoint (HF layout)")
    d.add_argument("dir")
    d.set_defaults(fn=cmd_demo_checkpoint)

    t = sub.add_parser("train-demo", help="train the default model (stdlib-5m) on this Python's stdlib sources")
    # Defaults are TrainOptions' (applied by cmd_train_demo): importing the trainer here would import torch.
    t.add_argument("--out", help="checkpoint directory (default: export/demo/train.py's DEFAULT_DIR)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: TrainOptions.steps)")
    t.add_argument("--seed", type=int, help="seed of the weights and the batches (default: TrainOptions.seed)")
    t.set_defaults(fn=cmd_train_demo)

    o = sub.add_parser("demo-outliers", help="stdlib-5m with LLM-like activation outliers (channel outliers and "
                                             "massive activations), the function kept; export/demo/outliers.py")
    o.add_argument("--out", help="checkpoint directory (default: checkpoints/stdlib-5m-outliers)")
    o.add_argument("--source", help="the checkpoint to rewrite, only read (default: checkpoints/stdlib-5m)")
    o.add_argument("--no-spikes", action="store_true",
                   help="channel outliers only: a bit-exact rewrite of the source's function")
    o.set_defaults(fn=cmd_demo_outliers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from llamaforge.build.errors import BuildError
    from llamaforge.export.config import ConfigError
    from llamaforge.triton_repo.repository import RepoError

    known: tuple[type[BaseException], ...] = (BuildError, ConfigError, RepoError, ValueError, KeyError,
                                              FileNotFoundError)
    try:
        args.fn(args)
    except known as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
