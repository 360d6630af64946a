"""llama.cpp's side of `make bench-quant` (speed), run by the llama.cpp venv's python
(bench/.work/quant-peers/llamacpp-venv, made by bench/quant_peers.py): it imports only the standard
library, numpy, llama_cpp and gguf, never llama-forge.

  llamacpp_worker.py quantize IN.gguf OUT.gguf TYPE   q8_0 / q4_0 by llama.cpp's llama_model_quantize
  llamacpp_worker.py tensors FILE.gguf                 JSON [[name, [ne0, ne1, ...], n_bytes], ...]
  llamacpp_worker.py serve                             JSON lines on stdin -> JSON lines on stdout:
      {"op": "load", "name": N, "path": P, "threads": T, "n_ctx": C} -> {"ok": true}
      {"op": "decode", "name": N, "prompt": [ids], "new_tokens": K}
          -> {"ok": true, "prefill_s": s, "decode_s": s, "tokens": [K ids]}
      {"op": "quit"}
  Errors come back as {"ok": false, "error": "..."}.

Decode is greedy (argmax of the last position's logits, read straight from llama.cpp's buffer),
one `Llama.eval` call per token after the prompt's one; `decode_s` runs from the first generated
token to the last, so it holds K - 1 decode steps and no prompt evaluation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def quantize(src: str, dst: str, kind: str) -> None:
    if kind not in FTYPES:
        raise SystemExit(f"quantize: type {kind!r} is not one of {sorted(FTYPES)}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}, {kind}) returned {rc}")


def tensors(path: str) -> list[list[Any]]:
    from gguf import GGUFReader

    return [[t.name, [int(n) for n in t.shape], int(t.n_bytes)] for t in GGUFReader(path).tensors]


class Server:
    def __init__(self) -> None:
        self.models: dict[str, Any] = {}

    def load(self, name: str, path: str, threads: int, n_ctx: int) -> dict[str, Any]:
        from llama_cpp import Llama

        self.models[name] = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                  n_threads_batch=threads, verbose=False)
        return {"ok": True}

    def decode(self, name: str, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        import llama_cpp
        import numpy as np

        llm = self.models[name]
        n_vocab = llm.n_vocab()

        def greedy() -> int:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            return int(logits.argmax())

        llm.reset()  # the next eval drops every cached position
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [greedy()]
        first = time.perf_counter()
        while len(tokens) < new_tokens:
            llm.eval([tokens[-1]])
            tokens.append(greedy())
        return {"ok": True, "prefill_s": first - start, "decode_s": time.perf_counter() - first, "tokens": tokens}


def serve() -> None:
    # llama.cpp and ggml print to the process's stdout/stderr at the C level; the protocol gets a
    # private copy of stdout and fd 1 becomes stderr, so no library line can corrupt a reply.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    server = Server()
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "quit":
            break
        try:
            reply = server.load(**msg) if op == "load" else server.decode(**msg) if op == "decode" else \
                {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the bench, which stops with it
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")


def main(argv: list[str]) -> None:
    if argv[:1] == ["quantize"] and len(argv) == 4:
        quantize(*argv[1:])
    elif argv[:1] == ["tensors"] and len(argv) == 2:
        print(json.dumps(tensors(argv[1])))
    elif argv == ["serve"]:
        serve()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
