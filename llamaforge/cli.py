"""`llamaforge`: the command line under the Makefile. Subcommands mirror the make targets.

  llamaforge variants                      make variants
  llamaforge export  --model M ...         (traced ONNX with the plugin op, before any pass)
  llamaforge build   --model M ...         make engine
  llamaforge generate ENGINE PROMPT...     make generate
  llamaforge passes                        the pass pipelines per backend
  llamaforge demo-checkpoint DIR           the default model's checkpoint
  llamaforge serve ENGINE [--port ...]     make serve (Triton-protocol gRPC server + /metrics)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _weights(value: str) -> bool:
    if value not in ("checkpoint", "none"):
        raise argparse.ArgumentTypeError("WEIGHTS must be 'checkpoint' or 'none'")
    return value == "checkpoint"


def cmd_variants(args: argparse.Namespace) -> None:
    from export.variants import format_table

    print(format_table())


def cmd_passes(args: argparse.Namespace) -> None:
    from graphs.pipeline import PASSES, PIPELINES

    for backend, names in PIPELINES.items():
        print(f"{backend}: {' -> '.join(names)}")
    print("passes:", ", ".join(sorted(PASSES)))


def cmd_export(args: argparse.Namespace) -> None:
    import onnx

    from export.checkpoint import open_checkpoint
    from export.exporter import PRECISIONS, bind_weights, save_streaming, tqdm_progress, trace
    from export.variants import get_variant
    from graphs.verify import skeleton_proto

    if args.checkpoint:
        ckpt = open_checkpoint(args.checkpoint, args.model)
        config = ckpt.config
    elif args.model:
        ckpt, config = None, get_variant(args.model).config
    else:
        raise ValueError("--model or --checkpoint is required")
    model = trace(config, args.precision)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        # Graph only: weights become graph inputs, so nothing the size of the model is written.
        onnx.save(skeleton_proto(model), str(out))
    else:
        bind_weights(model, ckpt, PRECISIONS[args.precision], tied=config.tie_word_embeddings)
        save_streaming(model, out, tqdm_progress("write weights"))
    print(f"exported: {out}")


def cmd_build(args: argparse.Namespace) -> None:
    from llamaforge.build import BuildOptions, build_engine

    build_engine(BuildOptions(
        model=args.model, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        out=Path(args.out) if args.out else None, precision=args.precision, backend=args.backend,
        weights=args.weights, dump_after=args.dump_after, dump_dir=Path(args.dump_dir) if args.dump_dir else None,
    ))


def cmd_generate(args: argparse.Namespace) -> None:
    from runtime.engine import Engine
    from runtime.generate import generate_text
    from runtime.sampling import SamplingParams

    engine = Engine(args.engine)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)
    for prompt, text in zip(args.prompt, generate_text(engine, args.prompt, args.max_new_tokens, params)):
        print(f"{prompt}{text}")
        print("-" * 40)


def cmd_serve(args: argparse.Namespace) -> None:
    from runtime.engine_core import CoreConfig
    from runtime.server import serve

    serve(args.engine, host=args.host, port=args.port, metrics_port=None if args.metrics_port < 0 else args.metrics_port,
          core_config=CoreConfig(kv_budget_tokens=args.kv_budget_tokens, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens, max_queue=args.max_queue),
          max_message_bytes=args.max_message_mb * 1024 * 1024)


def cmd_demo_checkpoint(args: argparse.Namespace) -> None:
    from llamaforge.demo import make_demo_checkpoint

    make_demo_checkpoint(Path(args.dir))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("variants", help="list registered variants with their parameter counts").set_defaults(fn=cmd_variants)
    sub.add_parser("passes", help="list pass pipelines").set_defaults(fn=cmd_passes)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", help="registered variant name (see `llamaforge variants`)")
        sp.add_argument("--checkpoint", help="HF or Meta checkpoint directory")
        sp.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])

    e = sub.add_parser("export", help="trace a checkpoint to ONNX with the attention plugin op (no passes)")
    model_args(e)
    e.add_argument("--out", required=True, help="output .onnx path")
    e.set_defaults(fn=cmd_export)

    b = sub.add_parser("build", help="export + pass pipeline + engine directory (make engine)")
    model_args(b)
    b.add_argument("--backend", default="ort", help="ort | trt")
    b.add_argument("--weights", default=True, type=_weights, help="checkpoint (default) | none: graph only")
    b.add_argument("--out", help="engine directory (default engines/MODEL)")
    b.add_argument("--dump-after", action="append", default=[], metavar="PASS", help="write the model after PASS")
    b.add_argument("--dump-dir", help="where --dump-after writes (default OUT.dump)")
    b.set_defaults(fn=cmd_build)

    g = sub.add_parser("generate", help="generate text from an engine directory")
    g.add_argument("engine")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="serve an engine over Triton's gRPC protocol (make serve)")
    s.add_argument("engine")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8001, help="gRPC port (default 8001; 0: a free one)")
    s.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus /metrics port (default 8002; 0: a free one; -1: none)")
    s.add_argument("--kv-budget-tokens", type=int, default=None, help="KV cache size in tokens")
    s.add_argument("--max-num-seqs", type=int, default=16, help="sequences in the running batch")
    s.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before RESOURCE_EXHAUSTED")
    s.add_argument("--max-message-mb", type=int, default=64, help="largest request message accepted")
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo-checkpoint", help="write the default demo checkpoint (HF layout)")
    d.add_argument("dir")
    d.set_defaults(fn=cmd_demo_checkpoint)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from export.config import ConfigError
    from llamaforge.build import BuildError

    known: tuple[type[BaseException], ...] = (BuildError, ConfigError, ValueError, KeyError, FileNotFoundError)
    try:
        args.fn(args)
    except known as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
