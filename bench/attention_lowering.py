"""Which ORT lowering of `LlamaAttention`? Times the standard-op decomposition against
`com.microsoft::GroupQueryAttention` (GQA) on the same shapes, and checks both against the reference.

GQA on CPU cannot take rows that continue a prefill (batch > 1, seq > 1, past > 0), which the op's
contract allows and the in-flight batcher needs; this script reports that case as unsupported.

  python bench/attention_lowering.py
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from llamaforge.graphs.passes.lower_attention import LowerAttentionForORT
from llamaforge.plugins.attention import reference
from llamaforge.plugins.attention.schema import AttentionAttrs, single_op_model

T = onnx.TensorProto


def decomposed(attrs: AttentionAttrs) -> ort.InferenceSession:
    model = ir.serde.deserialize_model(single_op_model(attrs))
    LowerAttentionForORT()(model)
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])


def gqa(attrs: AttentionAttrs, max_positions: int) -> ort.InferenceSession:
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * reference.rope_inv_freq(attrs)
    cos, sin = angles.cos().numpy(), angles.sin().numpy()
    vi = onnx.helper.make_tensor_value_info
    node = onnx.helper.make_node(
        "GroupQueryAttention", ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"],
        ["output", "present_key", "present_value"], domain="com.microsoft", num_heads=h, kv_num_heads=kvh, do_rotary=1,
        rotary_interleaved=attrs.rope_interleaved, scale=attrs.scale)
    cache = ["b", kvh, "c", d]
    graph = onnx.helper.make_graph(
        [node], "gqa",
        [vi("query", T.FLOAT, ["b", "s", h * d]), vi("key", T.FLOAT, ["b", "s", kvh * d]), vi("value", T.FLOAT, ["b", "s", kvh * d]),
         vi("past_key", T.FLOAT, cache), vi("past_value", T.FLOAT, cache), vi("seqlens_k", T.INT32, ["b"]), vi("total", T.INT32, [])],
        [vi("output", T.FLOAT, None), vi("present_key", T.FLOAT, None), vi("present_value", T.FLOAT, None)],
        [onnx.numpy_helper.from_array(cos, "cos"), onnx.numpy_helper.from_array(sin, "sin")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def timeit(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    attrs = AttentionAttrs(32, 8, 64)  # Llama 3.2 1B's attention shape
    capacity = 1024
    dec, gq = decomposed(attrs), gqa(attrs, capacity)
    print(f"attention {attrs.num_heads}q/{attrs.num_kv_heads}kv heads x {attrs.head_dim}, cache capacity {capacity}, "
          f"ORT {ort.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':<34}{'decomposed ms':>15}{'GQA ms':>10}{'GQA/dec':>9}  max|err| dec / GQA")
    cases = [("decode b=8 past=512..1000", 8, 1, [512 + 61 * i for i in range(8)]),
             ("decode b=1 past=1000", 1, 1, [1000]),
             ("prefill b=1 s=512 past=0", 1, 512, [0]),
             ("prefill b=4 s=128 past=0", 4, 128, [0] * 4),
             ("chunk b=2 s=64 past=[100,300]", 2, 64, [100, 300])]
    for name, batch, seq, past in cases:
        g = torch.Generator().manual_seed(0)
        h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
        f = dict(query=torch.randn(batch, seq, h * d, generator=g), key=torch.randn(batch, seq, kvh * d, generator=g),
                 value=torch.randn(batch, seq, kvh * d, generator=g), past_key=torch.randn(batch, kvh, capacity, d, generator=g),
                 past_value=torch.randn(batch, kvh, capacity, d, generator=g), past_lengths=torch.tensor(past, dtype=torch.int32))
        want = reference.llama_attention(*f.values(), attrs)[0].numpy()
        feeds = {k: v.numpy() for k, v in f.items()}
        gfeeds = {**{k: feeds[k] for k in ("query", "key", "value", "past_key", "past_value")},
                  "seqlens_k": (feeds["past_lengths"] + seq - 1).astype(np.int32), "total": np.array(max(past) + seq, np.int32)}
        repeat = 20 if seq == 1 else 3
        t_dec = timeit(lambda feeds=feeds: dec.run(None, feeds), repeat)
        err_dec = np.abs(dec.run(None, feeds)[0] - want).max()
        try:
            t_gqa = timeit(lambda gfeeds=gfeeds: gq.run(None, gfeeds), repeat)
            err_gqa = np.abs(gq.run(None, gfeeds)[0] - want).max()
            print(f"{name:<34}{t_dec * 1e3:>15.3f}{t_gqa * 1e3:>10.3f}{t_gqa / t_dec:>9.2f}  {err_dec:.1e} / {err_gqa:.1e}")
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            print(f"{name:<34}{t_dec * 1e3:>15.3f}{'unsupported':>10}{'':>9}  {err_dec:.1e} / ({str(e).split('Status Message: ')[-1][:60]})")


if __name__ == "__main__":
    main()
