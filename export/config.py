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

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        else:
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    # -- derived sizes -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Exact parameter count implied by the architecture numbers (no biases in LLaMA)."""
        h = self.hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + h + head

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        rs = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling(**rs) if rs else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", name: str = "custom") -> "ModelConfig":
        """Read a transformers `LlamaConfig` dict."""

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
        return d

    def describe_mismatch(self, other: "ModelConfig") -> list[str]:
        """Architecture fields on which two configs disagree (names and token ids ignored)."""
        fields = ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "rope_theta", "tie_word_embeddings"]
        out = []
        for f in fields:
            a, b = getattr(self, f), getattr(other, f)
            if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9):
                continue
            if a != b:
                out.append(f"{f}: checkpoint={a} registry={b}")
        return out


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
