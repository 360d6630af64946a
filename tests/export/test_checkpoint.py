"""Checkpoint loading (HF + Meta layouts), error reporting, tokenizer files and runtime tokenizers."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tiny_models import (
    SAMPLE_TEXTS,
    TINY_VOCAB,
    hf_state_dict,
    load_hf_oracle,
    make_hf_checkpoint,
    make_meta_checkpoint,
    tiny_config,
)

from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.export.checkpoint_errors import CheckpointError
from llamaforge.export.config import RopeScaling
from llamaforge.export.tokenizer_files import LLAMA3_PAT_STR, copy_tokenizer
from llamaforge.runtime.core.tokenizer import load_tokenizer

# -- shared checkpoints (built once per module) -------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_hf_checkpoint):
    base = tmp_path_factory.mktemp("ckpts")
    gqa = tiny_hf_checkpoint  # tiny_config(), seed 0, shared by the session (tests/conftest.py): copy before editing
    mha = make_hf_checkpoint(base / "hf_mha", tiny_config(num_kv_heads=4), seed=1)
    # Llama-3-like: GQA, tied embeddings, llama3 rope scaling.
    l3 = make_hf_checkpoint(base / "hf_l3", tiny_config(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)), seed=2)
    return {
        "gqa": gqa,
        "mha": mha,
        "l3": l3,
        "meta_mha_sp": make_meta_checkpoint(base / "meta_mha_sp", mha, mp=2, tokenizer="sentencepiece"),
        "meta_l3_tik": make_meta_checkpoint(base / "meta_l3_tik", l3, mp=2, tokenizer="tiktoken"),
    }


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _assert_owns_storage(t: torch.Tensor) -> None:
    # Streaming: a loaded tensor must not be a view into a whole-file buffer or mapping.
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


# -- HF layout ----------------------------------------------------------------------------------


def test_hf_sharded_streams_exact_state_dict(dirs):
    d = dirs["gqa"]
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) >= 2
    ckpt = open_checkpoint(d)
    assert ckpt.layout == "hf" and ckpt.tokenizer_kind == "hf" and ckpt.warnings == []
    assert ckpt.config.name == d.name
    assert ckpt.config.describe_mismatch(tiny_config()) == []
    oracle = load_hf_oracle(d).state_dict()
    names = []
    for name, t in ckpt.tensors():
        names.append(name)
        assert t.dtype == torch.float32 and ckpt.dtype_of(name) == torch.float32
        assert tuple(t.shape) == ckpt.shape_of(name) == ckpt.expected_shapes()[name]
        assert torch.equal(t, oracle[name]), name
        _assert_owns_storage(t)
    assert names == list(ckpt.expected_shapes())
    assert set(names) == set(oracle)
    assert ckpt.total_bytes() == sum(v.numel() * 4 for v in oracle.values())


def test_hf_single_file_without_index(dirs, tmp_path):
    from safetensors.torch import save_file

    d = _copy(dirs["gqa"], tmp_path)
    sd = hf_state_dict(d)
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    ckpt = open_checkpoint(d)
    assert ckpt.files == [d / "model.safetensors"]
    for name, t in ckpt.tensors():
        assert torch.equal(t, sd[name]), name
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, str(d / "model.safetensors"))
    _raises(d, "model.safetensors", "'lm_head.weight'")


def test_hf_tied_and_rope_parameters(dirs):
    ckpt = open_checkpoint(dirs["l3"])
    c = ckpt.config
    assert c.tie_word_embeddings and "lm_head.weight" not in ckpt.expected_shapes()
    # transformers 5 writes llama3 scaling under `rope_parameters`; it must not be lost.
    assert c.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192) and c.rope_theta == 500000.0


def test_variant_mismatch_is_reported_not_fatal(dirs):
    ckpt = open_checkpoint(dirs["gqa"], variant="llama2-7b")
    assert ckpt.config.name == "llama2-7b" and ckpt.config.family == "llama2"
    assert ckpt.config.hidden_size == 64  # the checkpoint's own config wins
    assert any("hidden_size" in w and "4096" in w for w in ckpt.warnings), ckpt.warnings


# -- Meta layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["meta_mha_sp", "meta_l3_tik"])
def test_meta_tensors_equal_hf(dirs, kind):
    hf_dir = dirs["mha"] if kind == "meta_mha_sp" else dirs["l3"]
    ckpt = open_checkpoint(dirs[kind])
    hf = open_checkpoint(hf_dir)
    assert ckpt.layout == "meta" and ckpt.model_parallel == 2
    assert ckpt.tokenizer_kind == ("sentencepiece" if kind == "meta_mha_sp" else "tiktoken")
    assert ckpt.config.describe_mismatch(hf.config) == []
    assert ckpt.config.rope_scaling == hf.config.rope_scaling
    assert ckpt.config.intermediate_size == hf.config.intermediate_size
    sd = hf_state_dict(hf_dir)
    names = [n for n, _ in ckpt.tensors()]
    assert names == list(hf.expected_shapes())
    for name in names:
        t = ckpt.load(name)
        assert t.dtype == torch.float32 and ckpt.shape_of(name) == tuple(t.shape)
        assert torch.equal(t, sd[name]), name
        _assert_owns_storage(t)
    if kind == "meta_l3_tik":
        assert ckpt.config.num_kv_heads == 2 and ckpt.config.tie_word_embeddings
        assert ckpt.config.bos_token_id == TINY_VOCAB - 256  # <|begin_of_text|> = len(ranks)
        assert ckpt.config.max_position_embeddings == 131072
    else:
        assert ckpt.config.num_kv_heads == ckpt.config.num_heads == 4


def test_meta_rope_permutation_matches_meta_reference(dirs):
    """Not circular: Meta's own complex-number RoPE on the raw (un-permuted, merged) Meta weights
    must give the same attention scores as transformers' RoPE on the loaded HF-convention weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    d = dirs["meta_l3_tik"]
    ckpt = open_checkpoint(d)
    c = ckpt.config
    shards = [torch.load(p, weights_only=True) for p in sorted(d.glob("consolidated.*.pth"))]
    wq_meta = torch.cat([s["layers.1.attention.wq.weight"] for s in shards], 0)
    wk_meta = torch.cat([s["layers.1.attention.wk.weight"] for s in shards], 0)
    wq_hf, wk_hf = ckpt.load("model.layers.1.self_attn.q_proj.weight"), ckpt.load("model.layers.1.self_attn.k_proj.weight")
    seq, hd, nh, nkv = 7, c.head_dim, c.num_heads, c.num_kv_heads
    x = torch.randn(1, seq, c.hidden_size, generator=torch.Generator().manual_seed(0))

    # Meta reference (llama/model.py): precompute_freqs_cis + apply_rotary_emb on adjacent pairs.
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))

    def meta_rope(t):  # [b, s, h, hd]
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(tc * freqs_cis[None, :, None, :]).flatten(3)

    qm = meta_rope((x @ wq_meta.T).view(1, seq, nh, hd)).transpose(1, 2)
    km = meta_rope((x @ wk_meta.T).view(1, seq, nkv, hd)).transpose(1, 2)
    # transformers: rotate-half RoPE (no rope scaling here so both use the plain frequencies).
    hf_cfg = LlamaConfig(**c.replace(rope_scaling=None).to_hf())
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, torch.arange(seq)[None])
    qh = (x @ wq_hf.T).view(1, seq, nh, hd).transpose(1, 2)
    kh = (x @ wk_hf.T).view(1, seq, nkv, hd).transpose(1, 2)
    qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    rep = nh // nkv
    scores_meta = qm @ km.repeat_interleave(rep, 1).transpose(-1, -2)
    scores_hf = qh @ kh.repeat_interleave(rep, 1).transpose(-1, -2)
    torch.testing.assert_close(scores_hf, scores_meta, rtol=1e-5, atol=1e-5)
    # ...and the un-permuted weights would not match (so the check has teeth).
    qbad = (x @ wq_meta.T).view(1, seq, nh, hd).transpose(1, 2)
    qbad, _ = apply_rotary_pos_emb(qbad, kh, cos, sin)
    assert not torch.allclose(qbad @ kh.repeat_interleave(rep, 1).transpose(-1, -2), scores_meta, atol=1e-3)


def test_meta_vocab_minus_one_bf16_and_variant(dirs, tmp_path):
    d = make_meta_checkpoint(tmp_path / "llama1", dirs["mha"], mp=2, vocab_minus_one=True, dtype=torch.bfloat16)
    assert json.loads((d / "params.json").read_text())["vocab_size"] == -1
    ckpt = open_checkpoint(d)
    assert ckpt.config.vocab_size == TINY_VOCAB
    assert any("vocab_size" in w for w in ckpt.warnings)
    assert ckpt.dtype_of("model.embed_tokens.weight") == torch.bfloat16
    sd = hf_state_dict(dirs["mha"])
    for name, t in ckpt.tensors():
        assert t.dtype == torch.bfloat16 and torch.equal(t, sd[name].to(torch.bfloat16)), name

    # Registry variant: context length and token ids come from it; rope scaling too when the
    # params.json has no rope_scaling_factor of its own.
    l3 = _copy(dirs["meta_l3_tik"], tmp_path, "l3")
    c = open_checkpoint(l3, variant="llama3.1-8b").config
    assert c.rope_scaling.factor == 32.0  # params.json's rope_scaling_factor is honoured
    assert c.bos_token_id == 128000 and c.max_position_embeddings == 131072 and c.family == "llama3.1"
    params = json.loads((l3 / "params.json").read_text())
    del params["rope_scaling_factor"]
    (l3 / "params.json").write_text(json.dumps(params))
    assert open_checkpoint(l3, variant="llama3.1-8b").config.rope_scaling.factor == 8.0
    assert open_checkpoint(l3).config.rope_scaling.factor == 8.0
    assert open_checkpoint(l3, variant="llama3.2-1b").config.rope_scaling.factor == 32.0


# -- bad inputs -----------------------------------------------------------------------------------


def _raises(path, *needles, **kw) -> str:
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path, **kw)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _shard_of(d: Path, tensor: str) -> str:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_missing_and_non_checkpoint_dirs(tmp_path):
    _raises(tmp_path / "nowhere", "nowhere")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "empty", "config.json", "params.json")


def test_missing_shard(dirs, tmp_path):
    d = _copy(dirs["gqa"], tmp_path)
    shard = _shard_of(d, "model.layers.1.mlp.up_proj.weight")
    (d / shard).unlink()
    _raises(d, shard, "model.safetensors.index.json")


def test_truncated_shard(dirs, tmp_path):
    d = _copy(dirs["gqa"], tmp_path)
    shard = _shard_of(d, "model.norm.weight")
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) - 100])
    _raises(d, shard, "truncated")


@pytest.mark.parametrize("corruption", ["garbage", "bad_json", "huge_header"])
def test_corrupt_safetensors_header(dirs, tmp_path, corruption):
    d = _copy(dirs["gqa"], tmp_path)
    shard = _shard_of(d, "model.embed_tokens.weight")
    data = (d / shard).read_bytes()
    if corruption == "garbage":
        new = bytes(range(256)) * 8
    elif corruption == "bad_json":
        (n,) = struct.unpack("<Q", data[:8])
        new = data[:8] + b"{not json" + b" " * (n - 9) + data[8 + n:]
    else:
        new = struct.pack("<Q", 1 << 40) + data[8:]
    (d / shard).write_bytes(new)
    _raises(d, shard, "header")


def test_wrong_tensor_shape(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(dirs["gqa"], tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = _shard_of(d, name)
    tensors = load_file(str(d / shard))
    tensors[name] = torch.zeros(64, 128)
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    msg = _raises(d, shard, f"'{name}'", "[64, 128]", "[128, 64]")
    assert msg.startswith(f"{shard}: tensor '{name}' has shape [64, 128], expected [128, 64]")
    # validate=False opens it anyway; validate() then reports the same problem.
    ckpt = open_checkpoint(d, validate=False)
    with pytest.raises(CheckpointError, match="up_proj"):
        ckpt.validate()


def test_config_disagrees_with_weights(dirs, tmp_path):
    d = _copy(dirs["gqa"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    _raises(d, "model.safetensors.index.json", "'model.layers.2.self_attn.q_proj.weight'")
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96, "head_dim": 24}))
    shard = _shard_of(d, "model.embed_tokens.weight")
    _raises(d, shard, "'model.embed_tokens.weight'", "[640, 64]", "[640, 96]")
    (d / "config.json").write_text("{ not json")
    _raises(d, "config.json")
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    _raises(d, "config.json", "hidden_size")


def test_missing_tokenizer(dirs, tmp_path):
    d = _copy(dirs["gqa"], tmp_path)
    (d / "tokenizer.json").unlink()
    _raises(d, "tokenizer.json")
    m = _copy(dirs["meta_mha_sp"], tmp_path, "meta")
    (m / "tokenizer.model").unlink()
    _raises(m, "tokenizer.model")
    (m / "tokenizer.model").write_bytes(b"\x00\x01 definitely not a tokenizer")
    _raises(m, "tokenizer.model")


def test_meta_bad_inputs(dirs, tmp_path):
    m = _copy(dirs["meta_mha_sp"], tmp_path, "m1")
    (m / "consolidated.00.pth").unlink()
    _raises(m, "consolidated.00.pth", "missing")

    m = _copy(dirs["meta_mha_sp"], tmp_path, "m2")
    data = (m / "consolidated.01.pth").read_bytes()
    (m / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
    _raises(m, "consolidated.01.pth")

    m = _copy(dirs["meta_mha_sp"], tmp_path, "m3")
    params = json.loads((m / "params.json").read_text())
    (m / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    _raises(m, "consolidated.00.pth", "'layers.2.attention.wq.weight'", "model.layers.2.self_attn.q_proj.weight")
    (m / "params.json").write_text(json.dumps({**params, "dim": 128}))
    _raises(m, "consolidated.00.pth", "tok_embeddings.weight")
    (m / "params.json").write_text("[1, 2")
    _raises(m, "params.json")


_UNPICKLED = []


def _mark_unpickled() -> str:
    _UNPICKLED.append(True)
    return "pwned"


class _Evil:
    def __reduce__(self):
        return (_mark_unpickled, ())


def test_pth_is_loaded_weights_only(dirs, tmp_path):
    m = _copy(dirs["meta_mha_sp"], tmp_path)
    sd = torch.load(m / "consolidated.01.pth", weights_only=True)
    sd["evil"] = _Evil()
    torch.save(sd, m / "consolidated.01.pth")
    _raises(m, "consolidated.01.pth", "refused")
    assert not _UNPICKLED


# -- tokenizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gqa", "meta_mha_sp", "meta_l3_tik"])
def test_tokenizer_round_trip(dirs, tmp_path, which):
    ckpt = open_checkpoint(dirs[which])
    info = copy_tokenizer(ckpt, tmp_path / "engine")
    assert info["kind"] == ckpt.tokenizer_kind and (tmp_path / "engine" / info["file"]).is_file()
    json.dumps(info)  # manifest-ready
    tok = load_tokenizer(tmp_path / "engine", info)
    assert tok.vocab_size == TINY_VOCAB == ckpt.config.vocab_size
    assert tok.bos_id == ckpt.config.bos_token_id and tok.eos_ids == ckpt.config.eos_token_id
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.encode(text, add_bos=False) == ids[1:]
        assert tok.decode(ids) == text
        raw = b"".join(tok.id_to_bytes(i) for i in ids if not tok.is_special(i))
        if tok.strip_leading_space and raw.startswith(b" "):
            raw = raw[1:]
        assert raw == text.encode("utf-8"), (which, text)
    assert tok.is_special(tok.bos_id) and all(tok.is_special(e) for e in tok.eos_ids)
    # Special-token text in user input stays text unless asked for.
    eos_text = tok.id_to_bytes(tok.eos_ids[0]).decode()
    assert tok.eos_ids[0] not in tok.encode(f"a{eos_text}b")
    assert tok.eos_ids[0] in tok.encode(f"a{eos_text}b", allow_special=True)
    assert eos_text in tok.decode([tok.eos_ids[0]], skip_special_tokens=False)
    assert tok.decode([tok.eos_ids[0]]) == ""
    if info["kind"] == "tiktoken":
        n = info["num_base_tokens"]
        assert info["pattern"] == LLAMA3_PAT_STR and len(info["special_tokens"]) == 256
        sp = info["special_tokens"]
        assert sp["<|begin_of_text|>"] == n and sp["<|eot_id|>"] == n + 9 and sp["<|python_tag|>"] == n + 10
        assert sp["<|reserved_special_token_2|>"] == n + 11 and sp["<|reserved_special_token_246|>"] == n + 255
        assert tok.encode("<|eot_id|>", add_bos=False, allow_special=True) == [n + 9]
