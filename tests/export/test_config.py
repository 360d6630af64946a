"""ModelConfig readers: both spellings of llama3 rope scaling that transformers has written."""

from llamaforge.export.config import ModelConfig, RopeScaling

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=300)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


def test_rope_scaling_transformers4_spelling() -> None:
    cfg = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and cfg.rope_theta == 500000.0


def test_rope_scaling_transformers5_spelling() -> None:
    cfg = ModelConfig.from_hf({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and cfg.rope_theta == 500000.0


def test_default_rope_has_no_scaling() -> None:
    cfg = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6
