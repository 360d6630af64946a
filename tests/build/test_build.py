"""The build stage: engine directory contents, atomic install, bad input, graph-only builds, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.torch import load_file, save_file
from tiny_models import make_hf_checkpoint, tiny_config

from llamaforge import cli
from llamaforge.build.builder import BuildError, BuildOptions, build_engine, tensorrt_available
from llamaforge.export.checkpoint import HFCheckpoint
from llamaforge.graphs.pipeline import PipelineError
from llamaforge.runtime.core.engine import Engine, EngineError, read_manifest
from llamaforge.runtime.core.manifest import MANIFEST_VERSION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", tiny_config(), seed=11)


@pytest.fixture(scope="module")
def good_engine(good_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny"
    build_engine(BuildOptions(model="llama3.2-1b", checkpoint=good_ckpt, out=out))
    return out


def copy_ckpt(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"partial engine directory {out} left behind"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, f"temporary directories left behind: {leftovers}"


# -- the engine directory -------------------------------------------------------------------------


def test_engine_directory_and_manifest(good_engine: Path) -> None:
    manifest = json.loads((good_engine / "manifest.json").read_text())
    assert manifest["format"] == "llama-forge-engine" and manifest["manifest_version"] == MANIFEST_VERSION
    assert read_manifest(good_engine).to_json() == manifest  # what the build writes, the typed manifest reads back
    assert manifest["precision"] == "fp32" and manifest["backend"] == "ort" and manifest["weights"] == "checkpoint"
    assert manifest["config"]["num_layers"] == 2 and manifest["config"]["num_kv_heads"] == 2
    names = [i["name"] for i in manifest["inputs"]]
    assert names == ["input_ids", "past_lengths", "logits_index", "past_key.0", "past_value.0", "past_key.1", "past_value.1"]
    assert [o["name"] for o in manifest["outputs"]][:2] == ["logits", "present_key.0"]
    assert manifest["inputs"][2]["shape"] == ["batch", "num_logits"]
    assert manifest["inputs"][3]["shape"] == ["batch", 2, "capacity", 16]
    assert manifest["kv_cache"]["layout"] == "bhcd-slots"
    assert manifest["special_tokens"] == {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": None}
    for tool in ("torch", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "python"):
        assert tool in manifest["tools"]
    assert (good_engine / manifest["tokenizer"]["file"]).exists()
    assert (good_engine / "model.onnx.data").stat().st_size > 0
    onnx.checker.check_model(str(good_engine / "model.onnx"), full_check=True)
    # MODEL names a variant whose architecture differs from the checkpoint: reported, checkpoint wins.
    assert any("hidden_size" in w for w in manifest["source"]["warnings"])


def test_engine_generates_batch(good_engine: Path) -> None:
    from llamaforge.runtime.core.generate import generate_text
    from llamaforge.runtime.core.sampling import SamplingParams

    engine = Engine(good_engine)
    texts = generate_text(engine, ["def f(x):", "import os\nimport sys\n", "a"], 8)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    sampled1 = generate_text(engine, ["class A:"], 8, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3))
    sampled2 = generate_text(engine, ["class A:", "x = 1"], 8, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3))
    assert sampled1[0] == sampled2[0], "a seed must give the same text whatever else is in the batch"


def test_logits_index_computes_only_the_positions_asked_for(good_engine: Path) -> None:
    engine = Engine(good_engine)
    ids = np.random.default_rng(0).integers(3, 500, (2, 7))
    every, _ = engine.step(ids, np.zeros(2, np.int32), engine.kv.empty(2, 16))  # default: all positions
    assert every.shape[:2] == (2, 7)
    some, _ = engine.step(ids, np.zeros(2, np.int32), engine.kv.empty(2, 16), np.array([[6, 0], [2, 2]]))
    assert some.shape[:2] == (2, 2)
    np.testing.assert_allclose(some, every[[[0], [1]], [[6, 0], [2, 2]]], rtol=1e-5, atol=1e-5)


def test_a_batched_continuation_runs_row_by_row_and_matches_a_fresh_prefill(good_engine: Path) -> None:
    """Attention is ORT's GQA kernel alone (no fallback `If`), which refuses several rows continuing
    after a past; the manifest says so and `Engine.step` runs such a call one row at a time. Its
    logits and caches equal each row's prefill of all its tokens from position 0, for a row whose
    last tokens overflow its cache too (the op drops them; their logits are undefined)."""
    manifest = json.loads((good_engine / "manifest.json").read_text())
    assert manifest["kv_cache"]["batched_continuation"] is False
    graph = onnx.load(str(good_engine / "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "If"]
    engine = Engine(good_engine)
    rng = np.random.default_rng(4)
    pasts, seq, capacity = [3, 0, 9, 30], 4, 32  # the last row has room for 2 of its 4 tokens
    ids = rng.integers(3, 500, (len(pasts), max(pasts) + seq))
    caches = engine.kv.empty(len(pasts), capacity)
    for b, n in enumerate(pasts):  # each row's first n tokens, as a prefill of its own
        if n:
            _, present = engine.step(ids[b : b + 1, :n], np.zeros(1, np.int32), [c[b : b + 1] for c in caches])
            for cache, p in zip(caches, present):
                cache[b : b + 1] = p
    step_ids = np.stack([ids[b, n : n + seq] for b, n in enumerate(pasts)])
    logits, present = engine.step(step_ids, np.array(pasts, np.int32), caches)
    assert logits.shape[:2] == (len(pasts), seq)
    for b, n in enumerate(pasts):
        end = min(n + seq, capacity)
        want, want_present = engine.step(ids[b : b + 1, :end], np.zeros(1, np.int32), engine.kv.empty(1, capacity))
        np.testing.assert_allclose(logits[b, : end - n], want[0, n:], rtol=1e-4, atol=1e-4)
        for got, expected in zip(present, want_present):
            np.testing.assert_allclose(got[b, :, :end], expected[0, :, :end], rtol=1e-5, atol=1e-5)


def test_decode_writes_the_new_token_into_the_cache_in_place(good_engine: Path) -> None:
    """The decode fast path (past and present bound to one buffer) gives the copying path's logits
    and cache, writes only each row's new token, and is what the manifest allows for this engine."""
    engine = Engine(good_engine)
    assert json.loads((good_engine / "manifest.json").read_text())["kv_cache"]["decode_in_place"] is True
    assert engine.decode_in_place
    rng = np.random.default_rng(1)
    spec = engine.kv
    past = [rng.standard_normal((4, spec.num_kv_heads, 64, spec.head_dim)).astype(spec.dtype)
            for _ in range(2 * spec.num_layers)]
    lengths = np.array([0, 5, 31, 63], np.int32)  # empty, mid, and a full slot's last position
    ids = rng.integers(3, 500, (4, 1))
    want_logits, want_present = engine.step(ids, lengths, past)
    caches = [p.copy() for p in past]
    np.testing.assert_array_equal(engine.decode_in_place_step(ids, lengths, caches), want_logits)
    for got, want, before in zip(caches, want_present, past):
        for row, n in enumerate(lengths):
            np.testing.assert_array_equal(got[row, :, : n + 1], want[row, :, : n + 1])
            np.testing.assert_array_equal(got[row, :, n + 1 :], before[row, :, n + 1 :])
    with pytest.raises(EngineError, match=r"input_ids \[batch, 1\]"):
        engine.decode_in_place_step(np.ones((4, 2), np.int64), lengths, caches)
    # A graph that leaves the logits' width open (no engine we build does) has its logits fetched
    # from ONNX Runtime instead of written into an array bound for them: the same values.
    open_width = Engine(good_engine)
    open_width._logits_out = None
    caches = [p.copy() for p in past]
    np.testing.assert_array_equal(open_width.decode_in_place_step(ids, lengths, caches), want_logits)
    for got, want in zip(caches, want_present):
        for row, n in enumerate(lengths):
            np.testing.assert_array_equal(got[row, :, : n + 1], want[row, :, : n + 1])


def test_in_place_decode_keeps_its_binding_only_for_the_same_cache_arrays(good_engine: Path) -> None:
    """Step after step on the same arrays (the decode batch's) the binding is kept; other arrays,
    and the first ones again, are bound anew: each call writes into, and reads, the caches it was
    given, as the copying path does. A verify row ([1, S] tokens) between decode steps on the same
    arrays gets logits of its own shape, and the next decode step its own again. Each call's logits
    are an array of its own, which later calls leave alone. The token inputs' buffers are refilled,
    not bound anew, while the arrays and the shape stay."""
    engine = Engine(good_engine)
    rng = np.random.default_rng(2)
    spec = engine.kv
    pasts = [[rng.standard_normal((1, spec.num_kv_heads, 32, spec.head_dim)).astype(spec.dtype)
              for _ in range(2 * spec.num_layers)] for _ in range(2)]
    lengths = [np.array([9], np.int32), np.array([9], np.int32)]
    copies = [[p.copy() for p in past] for past in pasts]
    returned: list[tuple[np.ndarray, np.ndarray]] = []  # every call's logits, and a copy taken then
    previous: tuple[int, int, np.ndarray] | None = None  # the last call's arrays, width and input_ids buffer
    for which, width in ((0, 1), (0, 1), (0, 5), (0, 1), (1, 1), (0, 1), (1, 3), (1, 1)):
        ids = rng.integers(3, 500, (1, width))
        want_logits, want_present = engine.step(ids, lengths[which], pasts[which])
        got = engine.decode_in_place_step(ids, lengths[which], copies[which])
        returned.append((got, got.copy()))
        assert got.shape == want_logits.shape == (1, width, engine.manifest.vocab_size)
        np.testing.assert_array_equal(got, want_logits)
        end = int(lengths[which][0]) + width
        for cache, want in zip(copies[which], want_present):
            np.testing.assert_array_equal(cache[:, :, :end], want[:, :, :end])
        for past, cache in zip(pasts[which], copies[which]):
            past[:] = cache  # the reference path's next past is what was written
        lengths[which] = lengths[which] + width
        assert engine._in_place_binding is not None and engine._in_place_binding.caches[0] is copies[which][0]
        ids_buffer = engine._in_place_binding.inputs["input_ids"]
        if previous is not None and previous[:2] == (which, width):  # same arrays, same shape: refilled, not rebound
            assert ids_buffer is previous[2]
        previous = (which, width, ids_buffer)
    for logits, then in returned:  # a later call never writes into logits handed out before
        np.testing.assert_array_equal(logits, then)


def test_rebuild_replaces_engine_atomically(good_ckpt: Path, good_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    build_engine(BuildOptions(checkpoint=good_ckpt, out=out))
    before = (out / "manifest.json").read_text()
    bad = copy_ckpt(good_ckpt, tmp_path)
    shards(bad)[0].unlink()
    with pytest.raises(BuildError):
        build_engine(BuildOptions(checkpoint=bad, out=out))
    assert (out / "manifest.json").read_text() == before, "a failed build must not touch the previous engine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engine.")]


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_model(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    with pytest.raises(BuildError, match=r"MODEL.*'llama9-7b'.*llamaforge variants"):
        build_engine(BuildOptions(model="llama9-7b", weights=False, out=out))
    assert_nothing_left(out)


def test_missing_shard(good_ckpt: Path, tmp_path: Path) -> None:
    ckpt, out = copy_ckpt(good_ckpt, tmp_path), tmp_path / "engine"
    missing = shards(ckpt)[-1]
    missing.unlink()
    with pytest.raises(BuildError, match=missing.name):
        build_engine(BuildOptions(checkpoint=ckpt, out=out))
    assert_nothing_left(out)


def test_truncated_shard(good_ckpt: Path, tmp_path: Path) -> None:
    ckpt, out = copy_ckpt(good_ckpt, tmp_path), tmp_path / "engine"
    shard = shards(ckpt)[0]
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(BuildError, match=shard.name):
        build_engine(BuildOptions(checkpoint=ckpt, out=out))
    assert_nothing_left(out)


def test_corrupt_safetensors_header(good_ckpt: Path, tmp_path: Path) -> None:
    ckpt, out = copy_ckpt(good_ckpt, tmp_path), tmp_path / "engine"
    shard = shards(ckpt)[0]
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\x00not json at all"
    shard.write_bytes(bytes(data))
    with pytest.raises(BuildError, match=shard.name):
        build_engine(BuildOptions(checkpoint=ckpt, out=out))
    assert_nothing_left(out)


def test_tensor_of_wrong_shape(good_ckpt: Path, tmp_path: Path) -> None:
    ckpt, out = copy_ckpt(good_ckpt, tmp_path), tmp_path / "engine"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(BuildError, match=rf"{shard.name}.*{name}"):
        build_engine(BuildOptions(checkpoint=ckpt, out=out))
    assert_nothing_left(out)


def test_config_and_weights_disagree(good_ckpt: Path, tmp_path: Path) -> None:
    ckpt, out = copy_ckpt(good_ckpt, tmp_path), tmp_path / "engine"
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(BuildError, match=r"model\.layers\.2\."):
        build_engine(BuildOptions(checkpoint=ckpt, out=out))
    assert_nothing_left(out)


def test_unwritable_out(good_ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "engine"
    with pytest.raises(BuildError, match=r"OUT=.*a-file"):
        build_engine(BuildOptions(checkpoint=good_ckpt, out=out))
    assert not out.exists()


def test_failure_while_writing_leaves_nothing(good_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "engine"
    calls = {"n": 0}
    real_load = HFCheckpoint.load

    def flaky(self: HFCheckpoint, name: str):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:  # the weights are being streamed into the engine directory by now
            raise OSError(f"simulated read error on {name}")
        return real_load(self, name)

    monkeypatch.setattr(HFCheckpoint, "load", flaky)
    with pytest.raises(OSError, match="simulated"):
        build_engine(BuildOptions(checkpoint=good_ckpt, out=out))
    assert calls["n"] == 5
    assert_nothing_left(out)


def test_trt_backend_fails_fast_without_tensorrt(good_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `tensorrt-stubs` makes `import tensorrt` succeed with no API: that must not count as TensorRT.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert not tensorrt_available()
    with pytest.raises(BuildError, match="BACKEND=trt needs NVIDIA TensorRT"):
        build_engine(BuildOptions(checkpoint=good_ckpt, out=tmp_path / "engine", backend="trt"))
    assert_nothing_left(tmp_path / "engine")


# -- passes ---------------------------------------------------------------------------------------


def test_dump_after(good_ckpt: Path, tmp_path: Path) -> None:
    out, dump = tmp_path / "engine", tmp_path / "dump"
    build_engine(BuildOptions(checkpoint=good_ckpt, out=out, dump_after=["fuse-qkv"], dump_dir=dump))
    dumped = onnx.load(str(dump / "after-fuse-qkv.onnx"), load_external_data=False)
    names = {t.name for t in dumped.graph.initializer}
    assert "model.layers.0.self_attn.qkv_proj.weight.T" in names
    assert any(n.op_type == "LlamaAttention" for n in dumped.graph.node), "attention is lowered only later"


def test_unknown_dump_pass(good_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no-such-pass"):
        build_engine(BuildOptions(checkpoint=good_ckpt, out=tmp_path / "engine", dump_after=["no-such-pass"]))
    assert_nothing_left(tmp_path / "engine")


# -- graph-only builds ----------------------------------------------------------------------------


def test_graph_only_build_of_a_registered_variant(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    build_engine(BuildOptions(model="llama3.2-1b", weights=False, out=out, precision="bf16"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights"] == "none" and manifest["config"]["num_layers"] == 16
    data = out / "model.onnx.data"
    assert data.stat().st_size >= 2 * 1.2e9  # every bf16 weight has its place...
    assert data.stat().st_blocks * 512 < 1e6  # ...and none of it is written
    with pytest.raises(EngineError, match="WEIGHTS=none"):
        Engine(out)


# -- CLI and serving-host hygiene ----------------------------------------------------------------


def test_cli_variants_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["variants"]) == 0
    table = capsys.readouterr().out
    assert "llama3.1-405b" in table and "codellama-34b" in table
    assert cli.main(["build", "--model", "nope-1b", "--weights", "none", "--out", str(tmp_path / "e")]) == 2
    assert "nope-1b" in capsys.readouterr().err


def test_default_demo_engine_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `make engine` does with no arguments: demo checkpoint -> engine -> a generated sample."""
    ckpt, out = tmp_path / "demo", tmp_path / "engine"
    assert cli.main(["demo-checkpoint", str(ckpt)]) == 0
    assert cli.main(["build", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert oct(out.stat().st_mode & 0o777) != oct(0o700), "engine directory must be readable by a serving user"
    capsys.readouterr()
    assert cli.main(["generate", str(out), "def main(", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def main(")


def test_runtime_never_imports_torch_or_build_stages(tmp_path: Path) -> None:
    """A serving host needs no torch: no runtime module may pull it, or export/ or graphs/."""
    modules = sorted(".".join(("llamaforge.runtime", *p.relative_to(ROOT / "runtime").with_suffix("").parts))
                     for p in (ROOT / "runtime").rglob("*.py") if p.stem != "__init__")
    assert {"llamaforge.runtime.core.engine", "llamaforge.runtime.core.engine_core", "llamaforge.runtime.serving.server",
            "llamaforge.runtime.core.tokenizer", "llamaforge.runtime.core.detokenizer"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx')\n"
            "       or m.split('.')[:2] in (['llamaforge', 'export'], ['llamaforge', 'graphs'], ['llamaforge', 'build'])]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
