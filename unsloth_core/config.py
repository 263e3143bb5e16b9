"""Model configuration: a small dataclass that reads and writes Hugging Face `config.json`.

Only the Llama architecture is supported; anything else is refused when the file is read, with a message
that names what was found, so a user learns it before any weight is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unsloth_core.errors import ModelFormatError

# The seven linear projections of a Llama block, by their HF module names (what LoRA targets and NF4 stores).
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass
class LlamaConfig:
    """Shape and numerics of a Llama-architecture model (the fields of HF's `LlamaConfig` that matter to us)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: plain multi-head attention (as many KV heads as query heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF's rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # Keys of the source config.json we do not model, written back unchanged so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                supported = ", ".join(SUPPORTED_ROPE_TYPES)
                raise ModelFormatError(f"rope scaling of type {rope_type!r} is not supported (supported: {supported})")
            if rope_type == "default":
                self.rope_scaling = None
            else:
                self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
                self.rope_scaling.pop("type", None)

    @property
    def n_kv_heads(self) -> int:
        assert self.num_key_value_heads is not None  # set in __post_init__
        return self.num_key_value_heads

    @property
    def d_head(self) -> int:
        assert self.head_dim is not None  # set in __post_init__
        return self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(
                f"unsupported model_type {model_type!r}: this engine runs Llama-architecture models "
                f"(model_type 'llama') only"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        # transformers >= 5 writes rope_theta and the scaling inside one `rope_parameters` dict.
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict):
            if "rope_theta" in rope_params:
                kwargs["rope_theta"] = rope_params["rope_theta"]
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
            if scaling.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = scaling
        if "torch_dtype" not in kwargs and isinstance(d.get("dtype"), str):
            kwargs["torch_dtype"] = d["dtype"]
        ignored = {"rope_parameters", "dtype", "model_type", "architectures", "transformers_version"}
        extra = {k: v for k, v in d.items() if k not in known and k not in ignored}
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {**self.extra, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d["hidden_act"] = "silu"
        # Written in both spellings: transformers 4.x and vLLM read rope_theta/rope_scaling, 5.x rope_parameters.
        d["rope_parameters"] = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        return d

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LlamaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelFormatError(f"no config.json at {path}: is this a Hugging Face model directory?")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ModelFormatError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(d)

    def save(self, directory: str | os.PathLike[str]) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        from unsloth_core.presets import PRESETS

        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})
