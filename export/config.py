"""The architecture of one LLaMA-family text model, independent of where it came from.

A `ModelConfig` is built from the variant registry, from an HF `config.json`, or from a Meta
`params.json`; the exporter, the manifest and the runtime all speak this one shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config file or registry entry is missing a field or contradicts itself."""


@dataclass(frozen=True)
class RopeScaling:
    """The `llama3` RoPE frequency rescaling (Llama 3.1 onwards)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0 means hidden_size // num_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    name: str = "custom"
    family: str = "llama"
    # -- Llama 4 (transformers' Llama4TextConfig names). The defaults describe a dense LLaMA. --
    architecture: str = "llama"  # "llama" | "llama4": which HF module names and maths the weights follow
    rope_interleaved: bool = False  # RoPE on adjacent pairs (Llama 4's HF weights; Meta layout before conversion)
    intermediate_size_mlp: int = 0  # dense-layer FFN width of a MoE model (intermediate_size is the experts')
    num_local_experts: int = 0  # 0: no MoE layer
    num_experts_per_tok: int = 0
    interleave_moe_layer_step: int = 1  # layers step-1, 2*step-1, ... are MoE (unless moe_layers is given)
    moe_layers: tuple[int, ...] | None = None
    no_rope_layers: tuple[int, ...] = ()  # per layer: 1 uses RoPE, 0 is a NoPE layer (HF's confusing name)
    no_rope_layer_interval: int = 0  # with no_rope_layers empty: every interval-th layer is NoPE; 0: none
    attention_chunk_size: int = 0  # RoPE layers attend within chunks of this many tokens; 0: no chunking
    use_qk_norm: bool = False  # weightless L2 norm of q and k after RoPE, on RoPE layers
    attn_temperature_tuning: bool = False  # query temperature on NoPE layers
    floor_scale: float = 8192.0
    attn_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        object.__setattr__(self, "no_rope_layers", tuple(int(x) for x in self.no_rope_layers))
        if self.moe_layers is not None:
            object.__setattr__(self, "moe_layers", tuple(int(x) for x in self.moe_layers))
        self._check_llama4_fields()
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        else:
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def _check_llama4_fields(self) -> None:
        where = self.name
        if self.architecture not in ("llama", "llama4"):
            raise ConfigError(f"{where}: architecture={self.architecture!r} is not one of 'llama', 'llama4'")
        if self.num_local_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ConfigError(f"{where}: num_experts_per_tok={self.num_experts_per_tok} must be in "
                                  f"1..num_local_experts={self.num_local_experts}")
            if self.interleave_moe_layer_step < 1:
                raise ConfigError(f"{where}: interleave_moe_layer_step={self.interleave_moe_layer_step} must be >= 1")
            bad = [i for i in self.moe_layers or () if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"{where}: moe_layers {bad} are not layers of a {self.num_layers}-layer model")
        if self.no_rope_layers and len(self.no_rope_layers) < self.num_layers:
            raise ConfigError(f"{where}: no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_layers} layers")
        if self.attention_chunk_size < 0 or self.no_rope_layer_interval < 0:
            raise ConfigError(f"{where}: attention_chunk_size and no_rope_layer_interval must be >= 0")

    # -- per-layer structure (Llama 4) ----------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def moe_layer_indices(self) -> tuple[int, ...]:
        """Layers whose FFN is a mixture of experts (transformers' `moe_layers`)."""
        if not self.num_local_experts:
            return ()
        if self.moe_layers is not None:
            return self.moe_layers
        step = self.interleave_moe_layer_step
        return tuple(range(step - 1, self.num_layers, step))

    def layer_uses_rope(self, layer: int) -> bool:
        """False on Llama 4's NoPE layers."""
        if self.no_rope_layers:
            return bool(self.no_rope_layers[layer])
        if self.no_rope_layer_interval:
            return (layer + 1) % self.no_rope_layer_interval != 0
        return True

    @property
    def dense_intermediate_size(self) -> int:
        """FFN width of a layer without experts."""
        return self.intermediate_size_mlp or self.intermediate_size

    # -- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self, active: bool = False) -> int:
        """Exact parameter count implied by the architecture numbers (no biases in LLaMA). With
        `active`, a MoE layer counts only the `num_experts_per_tok` experts one token runs (plus
        its router and shared expert): the parameters touched per token."""
        h = self.hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        moe = set(self.moe_layer_indices())
        experts = self.num_experts_per_tok if active else self.num_local_experts
        total = 0
        for layer in range(self.num_layers):
            if layer in moe:  # router + routed experts + the shared expert
                ffn = h * self.num_local_experts + (experts + 1) * 3 * h * self.intermediate_size
            else:
                ffn = 3 * h * self.dense_intermediate_size
            total += attn + ffn + 2 * h  # two RMSNorm weights
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + total + h + head

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("moe_layers") is not None:
            d["moe_layers"] = tuple(d["moe_layers"])
        rs = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling(**rs) if rs else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", name: str = "custom") -> ModelConfig:
        """Read a transformers `LlamaConfig` dict, or a `Llama4TextConfig` (also nested as the
        `text_config` of a multimodal `Llama4Config`)."""
        if hf.get("model_type") == "llama4":
            text = hf.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: model_type 'llama4' without a 'text_config' object")
            hf, source = text, f"{source}: text_config"
        llama4 = _llama4_fields(hf, source) if hf.get("model_type") == "llama4_text" else {}

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"{source}: missing field '{key}'")
            return hf[key]

        # transformers < 5 writes `rope_scaling`; 5.x writes `rope_parameters` (with rope_theta inside).
        rs = hf.get("rope_scaling") or None
        if rs is None and (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            rs = hf["rope_parameters"]
        scaling = None
        if rs:
            rtype = rs.get("rope_type", rs.get("type"))
            if rtype == "llama3":
                scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                )
            elif rtype not in (None, "default"):
                raise ConfigError(f"{source}: field 'rope_scaling.rope_type'={rtype!r} is not supported (only 'llama3')")
        # transformers 5 moved rope_theta into rope_parameters.
        theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        heads = int(need("num_attention_heads"))
        eos = hf.get("eos_token_id", 2)
        return cls(
            hidden_size=int(need("hidden_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or 0),
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            pad_token_id=hf.get("pad_token_id"),
            name=name,
            **llama4,
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent transformers `LlamaConfig` kwargs (used by tests to build oracles)."""
        d: dict[str, Any] = dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            pad_token_id=self.pad_token_id,
        )
        if self.rope_scaling:
            d["rope_scaling"] = dict(
                rope_type="llama3",
                factor=self.rope_scaling.factor,
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
            )
        if self.architecture == "llama4":  # Llama4TextConfig kwargs
            d.update(
                intermediate_size_mlp=self.dense_intermediate_size,
                num_local_experts=self.num_local_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                interleave_moe_layer_step=self.interleave_moe_layer_step,
                moe_layers=list(self.moe_layer_indices()),
                no_rope_layers=[int(self.layer_uses_rope(i)) for i in range(self.num_layers)],
                attention_chunk_size=self.attention_chunk_size or None,
                use_qk_norm=self.use_qk_norm,
                attn_temperature_tuning=self.attn_temperature_tuning,
                floor_scale=int(self.floor_scale) if float(self.floor_scale).is_integer() else self.floor_scale,
                attn_scale=self.attn_scale,
            )
        return d

    def describe_mismatch(self, other: ModelConfig) -> list[str]:
        """Architecture fields on which two configs disagree (names and token ids ignored)."""
        fields = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "rope_theta", "tie_word_embeddings", "architecture", "intermediate_size_mlp",
                  "num_local_experts", "num_experts_per_tok", "attention_chunk_size", "use_qk_norm"]
        out = []
        for f in fields:
            a, b = getattr(self, f), getattr(other, f)
            if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9):
                continue
            if a != b:
                out.append(f"{f}: checkpoint={a} registry={b}")
        return out


def _llama4_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The Llama 4 fields of a `Llama4TextConfig` dict, with transformers' defaults where absent."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: field 'hidden_act'={hf['hidden_act']!r} is not supported (only 'silu')")
    layers = int(hf.get("num_hidden_layers", 0))
    interval = int(hf.get("no_rope_layer_interval", 4))
    no_rope = [int(x) for x in hf.get("no_rope_layers") or []] or [int((i + 1) % interval != 0) for i in range(layers)]
    chunk = int(hf.get("attention_chunk_size") or 0)
    layer_types = hf.get("layer_types")
    if layer_types is not None:  # transformers makes exactly the RoPE layers chunked; nothing else is modelled
        want = ["chunked_attention" if r else "full_attention" for r in no_rope[:layers]]
        if list(layer_types) != want:
            raise ConfigError(f"{source}: field 'layer_types' must mark exactly the RoPE layers (no_rope_layers=1) "
                              f"as 'chunked_attention'; got {layer_types}")
    moe_layers = hf.get("moe_layers")
    return dict(
        architecture="llama4",
        family="llama4",
        rope_interleaved=True,  # transformers' Llama 4 rotates adjacent pairs (complex multiplication)
        intermediate_size_mlp=int(hf.get("intermediate_size_mlp", 16384)),
        num_local_experts=int(hf.get("num_local_experts", 16)),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 1)),
        interleave_moe_layer_step=int(hf.get("interleave_moe_layer_step", 1)),
        moe_layers=tuple(int(x) for x in moe_layers) if moe_layers is not None else None,
        no_rope_layers=tuple(no_rope),
        no_rope_layer_interval=interval,
        attention_chunk_size=chunk,
        use_qk_norm=bool(hf.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(hf.get("attn_temperature_tuning", True)),
        floor_scale=float(hf.get("floor_scale", 8192)),
        attn_scale=float(hf.get("attn_scale", 0.1)),
    )


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FFN width as Meta's reference code derives it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def load_json(path: Any) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
