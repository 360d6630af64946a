"""`share-tied-embedding` (graphs/passes/tied_embedding.py): a tied LM head reads the embedding
table through Gemm(transB=1) instead of a pre-transposed copy, so the engine stores it once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from small_graphs import op_counts, run_ort, small_model

from llamaforge.graphs.passes.tied_embedding import ShareTiedEmbedding
from llamaforge.graphs.passes.weights import FoldWeightTransposes
from llamaforge.graphs.verify import verify

if TYPE_CHECKING:
    from tiny_models import TinyBuilds

FLOAT, INT64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
E = "model.embed_tokens.weight"
RNG = np.random.default_rng(0)


def head_model(table: np.ndarray, tied: bool) -> ir.Model:
    """ids [batch, seq] -> Gather(E) -> (hidden) -> MatMul(Transpose(head)) -> logits [batch, seq, vocab];
    the head is E itself when `tied`, as torch.export traces a tied nn.Linear."""
    vocab, _ = table.shape
    head = E if tied else "lm_head.weight"
    nodes = [onnx.helper.make_node("Gather", [E, "ids"], ["h"]),
             onnx.helper.make_node("Transpose", [head], ["ht"]),
             onnx.helper.make_node("MatMul", ["h", "ht"], ["logits"], name="lm_head")]
    weights = {E: table} if tied else {E: table, head: RNG.standard_normal(table.shape).astype(np.float32)}
    return small_model(nodes, {"ids": (INT64, ["batch", "seq"])}, {"logits": (FLOAT, ["batch", "seq", vocab])},
                       weights)


def test_a_tied_head_reads_the_embedding_through_gemm() -> None:
    table = RNG.standard_normal((11, 6)).astype(np.float32)
    ids = RNG.integers(0, 11, size=(2, 3))
    model = head_model(table, tied=True)
    (want,) = run_ort(model, {"ids": ids})
    FoldWeightTransposes()(model)
    assert f"{E}.T" in model.graph.initializers  # what the engine stored twice

    assert ShareTiedEmbedding()(model).modified
    verify(model, "share-tied-embedding")
    assert sorted(n for n in model.graph.initializers if n.endswith(".weight") or n.endswith(".T")) == [E]
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.inputs[1] is model.graph.initializers[E] and gemm.attributes.get_int("transB") == 1
    assert [o.name for o in model.graph.outputs] == ["logits"]
    (got,) = run_ort(model, {"ids": ids})
    assert got.shape == want.shape == (2, 3, 11)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_an_untied_head_keeps_its_pre_transposed_weight() -> None:
    model = head_model(RNG.standard_normal((11, 6)).astype(np.float32), tied=False)
    FoldWeightTransposes()(model)
    assert not ShareTiedEmbedding()(model).modified
    assert op_counts(model)[("", "Gemm")] == 0 and "lm_head.weight.T" in model.graph.initializers


@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp8", "int8-sq", "int8-wo"])
def test_a_tied_engine_stores_the_embedding_once(tiny_builds: TinyBuilds, precision: str, tmp_path: Path) -> None:
    """Every precision: one [vocab, hidden] table in the engine, and fp32 logits equal transformers'."""
    from tiny_models import corpus_text, tiny_config

    from llamaforge.runtime.core.engine import Engine

    config = dataclasses.replace(tiny_config(), tie_word_embeddings=True)
    ckpt = tiny_builds.hf_checkpoint(config, seed=3)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text())
    engine_dir = tiny_builds.engine(ckpt, precision=precision, calib=None if precision in ("fp32", "fp16") else calib)
    model = onnx.load(str(engine_dir / "model.onnx"), load_external_data=False)
    tables = [t.name for t in model.graph.initializer if sorted(t.dims) == sorted([config.vocab_size, config.hidden_size])]
    assert len(tables) == 1 and not tables[0].endswith(".T"), tables  # the Gather's and the head's
    if precision != "fp32":
        return
    from transformers import AutoModelForCausalLM

    ids = np.array([[1, 5, 9, 200, 31, 7]], np.int64)
    engine = Engine(engine_dir)
    logits, _ = engine.step(ids, np.zeros(1, np.int32), engine.kv.empty(1, 16),
                            np.arange(ids.shape[1], dtype=np.int64)[None])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(ckpt)).float()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
