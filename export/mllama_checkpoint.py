"""A Llama 3.2 Vision checkpoint in HF layout (`MllamaForConditionalGeneration`, `model_type` mllama).

Its tensors are read by the HF reader (`checkpoint.HFCheckpoint`, safetensors headers, one tensor at
a time) under the names the exported graphs use:

    stored (published files)               graph name
    vision_model.*                         vision_model.*            (vision.onnx)
    multi_modal_projector.*                multi_modal_projector.*   (vision.onnx)
    language_model.model.*                 model.*                   (model.onnx, the text decoder)
    language_model.lm_head.weight          lm_head.weight

transformers 5 keeps its in-memory names (`model.vision_model.*`, `model.language_model.*`,
`lm_head.weight`) out of the files it saves, but a checkpoint written with them reads the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaforge.export.checkpoint import HFCheckpoint, find_tokenizer_hf, hf_weight_map
from llamaforge.export.checkpoint_base import HF_CONFIG, hf_tensor_shapes
from llamaforge.export.checkpoint_errors import CheckpointError
from llamaforge.export.config import ConfigError, ModelConfig
from llamaforge.export.mllama_vision import vision_tensor_shapes
from llamaforge.export.vision_config import MLLAMA_EXTRA_EMBEDDINGS, VisionConfig

# (stored prefix, graph prefix), the first that matches wins.
_RENAMES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def graph_name(stored: str) -> str:
    for old, new in _RENAMES:
        if stored.startswith(old):
            return new + stored[len(old):]
    return stored


def text_decoder_shapes(text: ModelConfig, vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the text decoder (graph names): a Llama decoder's (`hf_tensor_shapes`), whose
    cross-attention layers have `cross_attn.*` projections, q/k RMSNorm weights and two tanh gates;
    `vocab_size + 8` embedding rows (the `<|image|>` token and 7 reserved), `vocab_size` output rows."""
    d = text.head_dim
    cross = {f"model.layers.{layer}." for layer in vision.cross_attention_layers}
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in hf_tensor_shapes(text).items():
        prefix = name[: name.find(".", len("model.layers.")) + 1] if name.startswith("model.layers.") else ""
        if prefix not in cross:
            out[name] = shape
            continue
        out[name.replace(".self_attn.", ".cross_attn.")] = shape
        if name.endswith("self_attn.o_proj.weight"):
            out[prefix + "cross_attn.q_norm.weight"] = (d,)
            out[prefix + "cross_attn.k_norm.weight"] = (d,)
            out[prefix + "cross_attn_attn_gate"] = (1,)
            out[prefix + "cross_attn_mlp_gate"] = (1,)
    out["model.embed_tokens.weight"] = (text.vocab_size + MLLAMA_EXTRA_EMBEDDINGS, text.hidden_size)
    out["lm_head.weight"] = (text.vocab_size, text.hidden_size)
    return out


class MllamaCheckpoint(HFCheckpoint):
    """`config` is the text decoder's (its `num_layers` counts the cross-attention layers), `vision`
    the rest; `expected_shapes` covers both graphs' weights."""

    layout = "hf-mllama"

    def __init__(self, *args: Any, vision: VisionConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vision = vision

    def _expected(self) -> dict[str, tuple[int, ...]]:
        cached = getattr(self, "_expected_cache", None)
        if cached is None or cached[0] is not self.config:
            shapes = {**vision_tensor_shapes(self.vision, self.config.hidden_size),
                      **text_decoder_shapes(self.config, self.vision)}
            cached = self._expected_cache = (self.config, shapes)
        return cached[1]

    @property
    def embedding_rows(self) -> int:
        """The `<|image|>` token (id `vocab_size`) and 7 reserved ids have embedding rows, not output rows."""
        return self.config.vocab_size + MLLAMA_EXTRA_EMBEDDINGS


def mllama_configs(hf: dict[str, Any], name: str) -> tuple[ModelConfig, VisionConfig]:
    """(text decoder config, vision config) of an HF `MllamaConfig` dict; CheckpointError naming the field."""
    try:
        vision = VisionConfig.from_hf(hf, source=HF_CONFIG)
        text = ModelConfig.from_hf(hf["text_config"], source=f"{HF_CONFIG}: text_config", name=name)
        text = text.replace(family="llama3.2-vision")
        vision.check_text_decoder(text)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(HF_CONFIG) else f"{HF_CONFIG}: {msg}") from None
    if text.tie_word_embeddings or text.is_moe:
        raise CheckpointError(f"{HF_CONFIG}: text_config: a Llama 3.2 Vision decoder is dense with an untied head")
    return text, vision


def open_mllama(path: Path, hf: dict[str, Any], name: str) -> MllamaCheckpoint:
    """Open an HF mllama checkpoint whose parsed `config.json` is `hf` (validated by the caller)."""
    text, vision = mllama_configs(hf, name)
    stored_map, index_file = hf_weight_map(path)
    weight_map: dict[str, str] = {}
    stored: dict[str, str] = {}
    for s, file in stored_map.items():
        g = graph_name(s)
        weight_map[g] = file
        if g != s:
            stored[g] = s
    tok_kind, tok_path = find_tokenizer_hf(path)
    warnings: list[str] = []
    ckpt = MllamaCheckpoint(path, text, tok_kind, tok_path, warnings, weight_map, index_file, stored, vision=vision)
    extra = sorted(set(weight_map) - set(ckpt.expected_shapes()))
    if extra:
        warnings.append(f"{len(extra)} unexpected tensor(s) ignored: {', '.join(extra[:5])}"
                        + (" ..." if len(extra) > 5 else ""))
    return ckpt
