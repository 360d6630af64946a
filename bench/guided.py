"""make bench-guided: what guided decoding (runtime/core/guided.py) costs.

1. Mask cost per token, llguidance vs xgrammar (what chose the library), at
   vocabularies of 32k and 128k: the 32000-token byte-level BPE of the bench model (bench/serve.py),
   and 128000 tokens made of it plus 96000 distinct concatenations of two of its tokens (seeded; no
   128k tokenizer can be trained or fetched here, so this one has a real tokenizer's kind of
   pieces, not a real one's statistics). Per library, vocabulary and constraint (a JSON schema, any
   JSON object, a regex, an EBNF grammar): 20 walks of up to 48 tokens, each step computing the mask
   (timed), then taking a random allowed token (consuming it: timed apart). A walk of random
   tokens is a hard case (a model's likely tokens revisit states). Each process's first mask (of
   any JSON object) is timed apart, as a one-time setup would be. xgrammar needs torch,
   which the runtime must not import, so it runs in a throwaway virtualenv, bench/.work/xgr-venv
   (xgrammar installed without deps over this virtualenv's packages); each library runs in its own
   process, on one thread.
2. Per-step overhead in the engine core (the target): the 125M bench model (fp32, ORT, as
   bench-serve's), 1 and 16 rows, prompts of 64 tokens: the decode step time (a row's time from
   its first to its last token / (new tokens - 1)), plain vs held to a JSON schema that cannot end
   so soon (an array of at least 64 items: of integers, and of strings, whose
   masks allow most of the vocabulary). Plain and the two guided runs take turns, 15 rounds of 32
   new tokens; the overhead is the median over rounds of each round's guided / plain step (the
   VM's speed drifts, and other work on its 2 cores comes in bursts: a round's pair ran seconds
   apart, so the drift mostly cancels in it; the medians of the step times and the best guided
   over the best plain are printed too). Target: <= 10% of a decode step at 16 rows.

  python bench/guided.py [--skip-mask-cost] [--skip-overhead] [--workdir bench/.work]
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

XGRAMMAR = "xgrammar==0.2.8"
XGRAMMAR_DEPS = ("apache-tvm-ffi",)  # its one dependency this virtualenv lacks
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                   "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{1,12}( [A-Z][a-z]{1,12})*, [0-9]{1,5} [A-Za-z ]{3,30}"
GBNF = """root ::= stmt+
stmt ::= name " = " expr "\\n"
expr ::= term ((" + " | " - ") term)*
term ::= name | [0-9]+ | "(" expr ")"
name ::= [a-z_] [a-z0-9_]*
"""
CONSTRAINTS = ("json_schema", "json_object", "regex", "ebnf")
WALKS, WALK_TOKENS = 20, 48


# -- 1. mask cost per token -------------------------------------------------------------------------------


def vocabularies(work: Path, tokenizer_json: Path) -> dict[str, Path]:
    """The 32k and 128k token lists (each token's bytes), cached as pickles under `work`."""
    from tokenizers import Tokenizer

    out = {"32k": work / "vocab-32k.pkl", "128k": work / "vocab-128k.pkl"}
    if all(p.exists() for p in out.values()):
        return out
    work.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer_json))
    decoder = _byte_decoder()
    base = [bytes(decoder[c] for c in tok.id_to_token(i)) for i in range(tok.get_vocab_size())]
    rng = np.random.default_rng(0)
    seen, extra = set(base), []
    while len(extra) < 128000 - len(base):
        a, b = rng.integers(2, len(base), 2)
        piece = base[a] + base[b]
        if piece not in seen:
            seen.add(piece)
            extra.append(piece)
    out["32k"].write_bytes(pickle.dumps(base))
    out["128k"].write_bytes(pickle.dumps(base + extra))
    return out


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed (the bench tokenizer is byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class _Llguidance:
    def __init__(self, tokens: list[bytes]) -> None:
        from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

        ids = {t: i for i, t in enumerate(tokens) if t and i > 1}
        longest = max(len(t) for t in tokens)

        class View:
            """What llguidance's TokenizerWrapper reads; `__call__` tokenizes the text a grammar
            forces (greedy longest match: the 128k vocabulary has no tokenizer of its own)."""

            eos_token_id, bos_token_id, special_token_ids = 1, 0, [0, 1]

            def __init__(self) -> None:
                self.tokens = tokens

            def __call__(self, s: Any) -> list[int]:
                b = s.encode() if isinstance(s, str) else bytes(s)
                out, i = [], 0
                while i < len(b):
                    n = next(n for n in range(min(longest, len(b) - i), 0, -1) if b[i:i + n] in ids)
                    out.append(ids[b[i:i + n]])
                    i += n
                return out

        self.LLMatcher = LLMatcher
        self.tokenizer = LLTokenizer(TokenizerWrapper(View()), n_vocab=len(tokens))
        self.words = (len(tokens) + 31) // 32
        self.vocab = len(tokens)

    def compile(self, kind: str) -> Any:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        m = self.LLMatcher
        grammar = {"json_schema": lambda: m.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False}),
                   "json_object": lambda: m.grammar_from_json_schema({"type": "object"},
                                                                     defaults={"whitespace_flexible": False}),
                   "regex": lambda: m.grammar_from_regex(REGEX),
                   "ebnf": lambda: m.grammar_from_lark(gbnf_to_lark(GBNF))}[kind]()
        template = m(self.tokenizer, grammar, log_level=0)
        assert not template.is_error(), template.get_error()
        return template

    def check(self, matcher: Any) -> None:
        assert not matcher.is_error(), matcher.get_error()

    def start(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def mask(self, matcher: Any) -> np.ndarray:
        bits = np.empty(self.words, np.int32)
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return bits

    def consume(self, matcher: Any, token: int) -> bool:
        matcher.consume_token(token)
        return bool(matcher.is_stopped())


class _Xgrammar:
    def __init__(self, tokens: list[bytes]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=len(tokens), stop_token_ids=[1])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.bitmask = xgr.allocate_token_bitmask(1, len(tokens))
        self.vocab = len(tokens)

    def compile(self, kind: str) -> Any:
        c = self.compiler
        return {"json_schema": lambda: c.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False),
                "json_object": lambda: c.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False),
                "regex": lambda: c.compile_regex(REGEX), "ebnf": lambda: c.compile_grammar(GBNF)}[kind]()

    def start(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher: Any) -> np.ndarray:
        matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask[0].numpy()

    def consume(self, matcher: Any, token: int) -> bool:
        assert matcher.accept_token(token)
        return bool(matcher.is_terminated())

    def check(self, matcher: Any) -> None:
        pass


def mask_worker(library: str, vocab_file: Path) -> dict[str, Any]:
    """Run in its own process (xgrammar: in its virtualenv): the timings of one library and vocabulary."""
    tokens = pickle.loads(vocab_file.read_bytes())
    t0 = time.perf_counter()
    lib = _Llguidance(tokens) if library == "llguidance" else _Xgrammar(tokens)
    result: dict[str, Any] = {"tokenizer_s": time.perf_counter() - t0}
    t0 = time.perf_counter()  # a process's first mask: apart, as a one-time setup would be
    lib.mask(lib.start(lib.compile("json_object")))
    result["first_mask_ms"] = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(0)
    for kind in CONSTRAINTS:
        t0 = time.perf_counter()
        compiled = lib.compile(kind)
        compile_s = time.perf_counter() - t0
        masks, consumes = [], []
        for _ in range(WALKS):
            matcher = lib.start(compiled)
            for _ in range(WALK_TOKENS):
                t0 = time.perf_counter()
                bits = lib.mask(matcher)
                masks.append(time.perf_counter() - t0)
                allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[: lib.vocab])
                allowed = allowed[allowed != 1]  # walk on: the end is never taken
                if allowed.size == 0:
                    break
                t0 = time.perf_counter()
                done = lib.consume(matcher, int(rng.choice(allowed)))
                consumes.append(time.perf_counter() - t0)
                if done:
                    break
            lib.check(matcher)  # a matcher in an error state would time its error path
        m = np.array(masks) * 1e6
        result[kind] = {"compile_ms": compile_s * 1e3, "mask_us_mean": float(m.mean()), "mask_us_p50": float(np.median(m)),
                        "mask_us_p99": float(np.percentile(m, 99)), "consume_us_mean": float(np.mean(consumes) * 1e6),
                        "steps": len(masks)}
    return result


def xgrammar_python(work: Path) -> Path:
    """The throwaway virtualenv's python: xgrammar without deps, over this virtualenv's packages (torch)."""
    venv = work / "xgr-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        own = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                             check=True, capture_output=True, text=True).stdout.strip()
        (Path(own) / "llamaforge-venv.pth").write_text(site + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", XGRAMMAR, *XGRAMMAR_DEPS], check=True)
    return py


def mask_cost(work: Path, tokenizer_json: Path) -> dict[str, Any]:
    vocab = vocabularies(work / "guided", tokenizer_json)
    pythons = {"llguidance": Path(sys.executable), "xgrammar": xgrammar_python(work)}
    results: dict[str, Any] = {}
    for size, path in vocab.items():
        for library, py in pythons.items():
            out = subprocess.run([str(py), __file__, "--mask-worker", library, str(path)], check=True,
                                 capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            results[f"{library} {size}"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nmask cost per token (us; mean / p50 / p99), {WALKS} walks of <= {WALK_TOKENS} tokens, one thread")
    print(f"{'library, vocab':<20} {'tokenizer s':>11} {'1st mask ms':>11} " + " ".join(f"{k:>24}" for k in CONSTRAINTS))
    for name, r in results.items():
        cells = " ".join(f"{r[k]['mask_us_mean']:>8.0f} /{r[k]['mask_us_p50']:>6.0f} /{r[k]['mask_us_p99']:>6.0f}"
                         for k in CONSTRAINTS)
        print(f"{name:<20} {r['tokenizer_s']:>11.2f} {r['first_mask_ms']:>11.1f} {cells}")
    print(f"{'compile ms':<44} " + " ".join(f"{k:>24}" for k in CONSTRAINTS))
    for name, r in results.items():
        print(f"{name:<44} " + " ".join(f"{r[k]['compile_ms']:>24.1f}" for k in CONSTRAINTS))
    return results


# -- 2. per-step overhead in the engine core --------------------------------------------------------------

OVERHEAD_SCHEMAS = {
    "ints": {"type": "array", "items": {"type": "integer"}, "minItems": 64},
    "strings": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 64},
}
NEW_TOKENS, PROMPT_TOKENS = 32, 64
REPEATS = 15


def step_ms(core: Any, rows: int, schema: dict[str, Any] | None, tag: str) -> float:
    """The median over rows of a row's decode step time (first to last token / (n - 1)), in ms."""
    from llamaforge.runtime.core.guided import GuidedSpec
    from llamaforge.runtime.core.requests import GenerationRequest
    from llamaforge.runtime.core.sampling import SamplingParams

    guided = GuidedSpec("json_schema", json.dumps(schema)) if schema is not None else None
    handles = []
    for r in range(rows):
        prompt = [0] + [int(t) for t in np.random.default_rng(r).integers(2, 32000, PROMPT_TOKENS - 1)]
        handles.append(core.submit(GenerationRequest(
            f"{tag}-{r}", prompt, NEW_TOKENS, SamplingParams(temperature=1.0, seed=r), min_tokens=NEW_TOKENS,
            guided=guided, detokenize=False)))
    steps = []
    for h in handles:
        last = list(h)[-1]
        assert last.num_output_tokens == NEW_TOKENS, (last.num_output_tokens, last.finish_reason)
        assert last.first_token_ns is not None and last.last_token_ns is not None
        steps.append((last.last_token_ns - last.first_token_ns) / (NEW_TOKENS - 1) / 1e6)
    return float(np.median(steps))


def overhead(engine: Path) -> dict[str, Any]:
    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
    from llamaforge.runtime.core.engine_core import EngineCore

    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=16 * 256),
                                         SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024)))
    core.start()
    results: dict[str, Any] = {}
    try:
        for rows in (1, 16):
            for name, schema in OVERHEAD_SCHEMAS.items():  # compiles (and caches) each schema
                step_ms(core, rows, schema, f"warm{rows}{name}")
            times: dict[str, list[float]] = {"plain": [], **{name: [] for name in OVERHEAD_SCHEMAS}}
            for rep in range(REPEATS):  # in rotation, so the VM's drift hits each alike
                for name in times:
                    times[name].append(step_ms(core, rows, OVERHEAD_SCHEMAS.get(name), f"{name}{rows}-{rep}"))
            for name in OVERHEAD_SCHEMAS:
                paired = np.median(np.array(times[name]) / np.array(times["plain"])) - 1  # each round's own pair
                results[f"{rows} rows, {name}"] = {"plain_ms": float(np.median(times["plain"])),
                                                   "guided_ms": float(np.median(times[name])),
                                                   "best_over_best": min(times[name]) / min(times["plain"]) - 1,
                                                   "overhead": float(paired)}
    finally:
        core.stop()
    print(f"\nper decode step, 125M bench model (fp32, ORT), {NEW_TOKENS} new tokens, {REPEATS} rounds "
          f"(load average {' '.join(open('/proc/loadavg').read().split()[:3])})")
    print(f"{'rows, schema':<20} {'plain ms':>9} {'guided ms':>10} {'overhead':>9} {'best / best':>12}")
    for name, r in results.items():
        print(f"{name:<20} {r['plain_ms']:>9.2f} {r['guided_ms']:>10.2f} {r['overhead']:>8.1%} "
              f"{r['best_over_best']:>11.1%}")
    worst = max(r["overhead"] for k, r in results.items() if k.startswith("16 rows"))
    print(f"target: <= 10% at 16 rows: {'met' if worst <= 0.10 else 'NOT met'} (worst {worst:.1%})")
    results["target_met"] = worst <= 0.10
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work")
    ap.add_argument("--skip-mask-cost", action="store_true", help="skip llguidance vs xgrammar mask timing")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--mask-worker", nargs=2, metavar=("LIBRARY", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mask_worker:
        print(json.dumps(mask_worker(args.mask_worker[0], Path(args.mask_worker[1]))))
        return 0
    import serve  # bench/serve.py, beside this script (its folder is the script's sys.path[0])

    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores")
    ckpt, engine, _, _ = serve.prepare(args.workdir, "bench", genai=False)
    if not args.skip_mask_cost:
        mask_cost(args.workdir, ckpt / "tokenizer.json")
    if not args.skip_overhead:
        return 0 if overhead(engine)["target_met"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
