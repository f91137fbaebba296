"""Model hyper-parameters, read from a Hugging Face or mlx-lm ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import ConfigError

# model_type values we run; qwen3_next differs only in how the checkpoint fuses projections.
TEXT_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    layer_types: List[str]
    linear_conv_kernel_dim: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    intermediate_size: int = 0
    mlp_only_layers: List[int] = field(default_factory=list)
    max_position_embeddings: int = 262144
    mtp_num_hidden_layers: int = 0
    eos_token_id: List[int] = field(default_factory=list)

    @property
    def rope_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    def is_sparse(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.mlp_only_layers

    @classmethod
    def from_config(cls, config: Dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a full config (``text_config`` nested or not); ``source`` names the file in errors."""
        model_type = config.get("model_type")
        text = config.get("text_config", config)
        text_type = text.get("model_type", model_type)
        if model_type not in TEXT_MODEL_TYPES and text_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(expected one of {', '.join(TEXT_MODEL_TYPES)})"
            )
        t = dict(text)
        try:
            n_layers = int(t["num_hidden_layers"])
            n_heads = int(t["num_attention_heads"])
            head_dim = int(t.get("head_dim") or int(t["hidden_size"]) // n_heads)
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None

        layer_types = t.get("layer_types")
        if layer_types is None:
            interval = int(t.get("full_attention_interval", 4))
            layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)
            ]
        if len(layer_types) < n_layers or any(
            lt not in ("full_attention", "linear_attention") for lt in layer_types[:n_layers]
        ):
            raise ConfigError(f"{source}: layer_types must list 'full_attention'/'linear_attention' for all {n_layers} layers")

        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", t.get("rope_theta", 10_000_000.0))
        partial = rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 0.25))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (expected 'default')")

        eos = config.get("eos_token_id", t.get("eos_token_id"))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

        required = (
            "vocab_size", "hidden_size", "num_key_value_heads", "linear_num_key_heads",
            "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "shared_expert_intermediate_size",
        )
        missing = [k for k in required if k not in t]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: t[k] for k in names if k in t}
        kwargs.update(
            model_type=text_type if text_type in TEXT_MODEL_TYPES else model_type,
            head_dim=head_dim,
            layer_types=list(layer_types[:n_layers]),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            eos_token_id=eos,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        )
        args = cls(**kwargs)
        if args.linear_num_value_heads % args.linear_num_key_heads:
            raise ConfigError(f"{source}: linear_num_value_heads must be a multiple of linear_num_key_heads")
        if args.num_attention_heads % args.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        return args


def read_config(model_dir: Path) -> Dict[str, Any]:
    """The parsed ``config.json`` of a model directory, with a one-line error if unusable."""
    path = Path(model_dir) / "config.json"
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (a model directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def quantization_of(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """mlx-lm's ``quantization`` section (also accepted under ``quantization_config``)."""
    q = config.get("quantization") or config.get("quantization_config")
    if q and "bits" in q and "group_size" in q:
        return q
    return None
