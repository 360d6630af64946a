"""How fast are the Triton attention kernels? (`make bench-kernels`; needs a CUDA GPU.)

Decode: `decode_attention` (flash-decoding) at batch 64, context 4096, Llama-3-8B heads (32 query /
8 KV, head_dim 128), fp16 cache, contiguous and paged, and an FP8 cache. Reported as the HBM
bandwidth it achieves reading K and V against the device's peak; target >= 80% on an H100.

Prefill: `prefill_attention` on prompts from scratch (causal, GQA, RoPE and the cache write
included) against `torch.nn.functional.scaled_dot_product_attention` (causal, K/V already expanded
to all heads, no RoPE, no cache write) on the same shapes, in TFLOP/s of the attention matmuls;
target >= 1.0x. Every tile configuration of `triton_kernels.OP_CONFIGS` is timed and the best is
reported, as is the single-launch (fused) kernel the TensorRT plugin runs.

Without a GPU it says so and exits 0.

  python bench/kernels.py [--peak-gbps N] [--quick]
"""

from __future__ import annotations

import argparse
import sys

import torch

from llamaforge.plugins.attention.schema import AttentionAttrs

# Peak HBM bandwidth by device name, GB/s, when the driver does not report the memory clock.
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0}


def peak_gbps(override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak-gbps"
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width (DDR)"
    for name, gbps in PEAK_GBPS.items():
        if name in props.name:
            return gbps, f"table entry {name!r}"
    raise SystemExit(f"unknown peak bandwidth for {props.name}: pass --peak-gbps")


def bench_ms(fn, warmup: int = 5, rep: int = 20) -> float:  # type: ignore[no-untyped-def]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def decode(tk, attrs: AttentionAttrs, peak: float, batch: int, context: int) -> None:  # type: ignore[no-untyped-def]
    kvh, d = attrs.num_kv_heads, attrs.head_dim
    dev = "cuda"
    q = torch.randn(batch, attrs.num_heads * d, device=dev, dtype=torch.float16)
    k = torch.randn(batch, kvh, context, d, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    block = 16
    tables = torch.randperm(batch * context // block, device=dev, dtype=torch.int32).view(batch, -1) + 1
    pool_k = torch.randn(batch * context // block + 1, kvh, block, d, device=dev, dtype=torch.float16)
    pool_v = torch.randn_like(pool_k)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    cases = [
        ("fp16 contiguous", lambda: tk.decode_attention(q, k, v, lens, attrs), k),
        ("fp16 paged (16)", lambda: tk.decode_attention(q, pool_k, pool_v, lens, attrs, block_tables=tables), k),
        ("fp8 contiguous", lambda: tk.decode_attention(q, k8, v8, lens, attrs, k_scale=0.5, v_scale=0.5), k8),
    ]
    print(f"\ndecode: batch {batch}, context {context}, heads {attrs.num_heads}/{kvh} x {d}")
    print(f"  {'cache':<18} {'ms':>8} {'GB/s':>9} {'of peak':>8}")
    for name, fn, cache in cases:
        ms = bench_ms(fn)
        gbps = tk.decode_bytes(cache, lens, kvh, d) / (ms * 1e-3) / 1e9
        verdict = ("  target >= 80%: " + ("met" if gbps >= 0.8 * peak else "NOT met")) if name == "fp16 contiguous" else ""
        print(f"  {name:<18} {ms:>8.3f} {gbps:>9.0f} {gbps / peak:>7.0%}{verdict}")


def prefill(tk, attrs: AttentionAttrs, batch: int, seq: int) -> None:  # type: ignore[no-untyped-def]
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    dev, dt = "cuda", torch.float16
    query = torch.randn(batch, seq, h * d, device=dev, dtype=dt)
    key = torch.randn(batch, seq, kvh * d, device=dev, dtype=dt)
    value = torch.randn_like(key)
    past_k = torch.zeros(batch, kvh, seq, d, device=dev, dtype=dt)
    past_v = torch.zeros_like(past_k)
    past = torch.zeros(batch, dtype=torch.int32, device=dev)
    flops = tk.attention_flops(batch, seq, 0, h, d)

    qs = query.view(batch, seq, h, d).transpose(1, 2)
    ks = key.view(batch, seq, kvh, d).transpose(1, 2).repeat_interleave(attrs.group_size, 1)
    vs = value.view(batch, seq, kvh, d).transpose(1, 2).repeat_interleave(attrs.group_size, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_ms = bench_ms(lambda: sdpa(qs, ks, vs, is_causal=True))
        backend = "flash"
    except RuntimeError:
        sdpa_ms = bench_ms(lambda: sdpa(qs, ks, vs, is_causal=True))
        backend = "default"

    print(f"\nprefill: batch {batch}, {seq} new tokens, heads {h}/{kvh} x {d}, fp16, causal")
    print(f"  {'kernel':<34} {'ms':>8} {'TFLOP/s':>8} {'vs SDPA':>8}")
    print(f"  {'SDPA (' + backend + ', no RoPE/cache)':<34} {sdpa_ms:>8.3f} {flops / sdpa_ms / 1e9:>8.1f} {1.0:>7.2f}x")
    best = None
    for tactic, config in tk.OP_CONFIGS.items():
        if tactic in tk.FP32_TACTICS:
            continue
        for fused in (False, True):
            try:
                ms = bench_ms(lambda config=config, fused=fused: tk.prefill_attention(
                    query, key, value, past_k, past_v, past, attrs, config=config, fused=fused))
            except Exception as exc:  # a tile config the device cannot run (shared memory)
                print(f"  tactic {tactic} {'fused' if fused else 'two-phase'}: {type(exc).__name__}: {exc}"[:120])
                continue
            label = f"tactic {tactic} {config.block_m}x{config.block_n} w{config.num_warps} " + \
                ("fused (TRT)" if fused else "two-phase")
            print(f"  {label:<34} {ms:>8.3f} {flops / ms / 1e9:>8.1f} {sdpa_ms / ms:>7.2f}x")
            if not fused and (best is None or ms < best[0]):
                best = (ms, label)
    if best:
        ratio = sdpa_ms / best[0]
        print(f"  best: {best[1]}: {ratio:.2f}x SDPA; target >= 1.0x: {'met' if ratio >= 1.0 else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbps", type=float, default=None, help="the device's peak HBM bandwidth")
    parser.add_argument("--quick", action="store_true", help="one prefill shape only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench-kernels needs a CUDA GPU and none is visible: nothing measured.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench-kernels needs OpenAI Triton (the 'test' extra): nothing measured.")
        return 0
    from llamaforge.plugins.attention import triton_kernels as tk

    if tk.interpreting():
        print("TRITON_INTERPRET is set: unset it to benchmark the compiled kernels.")
        return 0
    peak, source = peak_gbps(args.peak_gbps)
    print(f"device: {torch.cuda.get_device_name(0)}; peak HBM {peak:.0f} GB/s ({source}); "
          f"torch {torch.__version__}, triton {triton.__version__}")
    llama3_8b = AttentionAttrs(32, 8, 128, rope_theta=500000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0,
                               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_positions=8192)
    decode(tk, llama3_8b, peak, batch=64, context=4096)
    shapes = [(1, 4096)] if args.quick else [(1, 4096), (4, 2048), (1, 8192)]
    for batch, seq in shapes:
        prefill(tk, llama3_8b, batch, seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
