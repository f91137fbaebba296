"""Model hyper-parameters, read from a Hugging Face or mlx-lm ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: text_config must be a JSON object")
        text_type = text.get("model_type", model_type)
        if not _hashable(model_type) or not _hashable(text_type) or (
            model_type not in TEXT_MODEL_TYPES and text_type not in TEXT_MODEL_TYPES
        ):
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(expected one of {', '.join(TEXT_MODEL_TYPES)})"
            )
        t = dict(text)
        missing = [k for k in ("num_hidden_layers", "num_attention_heads", *_REQUIRED) if k not in t]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        _check_fields(t, source)
        n_layers, n_heads = t["num_hidden_layers"], t["num_attention_heads"]
        head_dim = t.get("head_dim") or t["hidden_size"] // n_heads
        if head_dim < 1:
            raise ConfigError(f"{source}: head_dim: hidden_size {t['hidden_size']} gives no dimension per head")

        layer_types = _layer_types(t, n_layers, source)
        rope_theta, partial = _rope(t, source)
        eos = config.get("eos_token_id", t.get("eos_token_id"))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
        if not isinstance(eos, list) or not all(_is_int(e) and e >= 0 for e in eos):
            raise ConfigError(f"{source}: eos_token_id must be a token id or a list of them")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: t[k] for k in names if k in t}
        kwargs.update(
            model_type=text_type if text_type in TEXT_MODEL_TYPES else model_type,
            head_dim=head_dim,
            layer_types=list(layer_types[:n_layers]),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            eos_token_id=eos,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        )
        args = cls(**kwargs)
        _check_shapes(args, source)
        return args


def _layer_types(t: Dict[str, Any], n_layers: int, source: str) -> List[str]:
    """``layer_types``, or the pattern ``full_attention_interval`` implies (every 4th layer attends)."""
    layer_types = t.get("layer_types")
    if layer_types is None:
        interval = t.get("full_attention_interval", 4)
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    if not isinstance(layer_types, list) or len(layer_types) < n_layers or not all(
        isinstance(lt, str) and lt in ("full_attention", "linear_attention") for lt in layer_types[:n_layers]
    ):
        raise ConfigError(f"{source}: layer_types must list 'full_attention'/'linear_attention' for all {n_layers} layers")
    return layer_types


def _rope(t: Dict[str, Any], source: str) -> Tuple[float, float]:
    """(rope_theta, partial_rotary_factor), from ``rope_parameters`` (or ``rope_scaling``) or the top level."""
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: rope_parameters must be a JSON object")
    rope_theta = _number(rope.get("rope_theta", t.get("rope_theta", 10_000_000.0)), "rope_theta", source, 0.0, None)
    partial = _number(rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 0.25)),
                      "partial_rotary_factor", source, 0.0, 1.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (expected 'default')")
    return rope_theta, partial


def _check_shapes(args: "ModelArgs", source: str) -> None:
    """What each field may be alone is checked by ``_check_fields``; these are the relations between them."""
    if args.linear_num_value_heads % args.linear_num_key_heads:
        raise ConfigError(f"{source}: linear_num_value_heads must be a multiple of linear_num_key_heads")
    if args.num_attention_heads % args.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    if args.num_experts_per_tok > args.num_experts:
        raise ConfigError(
            f"{source}: num_experts_per_tok {args.num_experts_per_tok} exceeds num_experts {args.num_experts}"
        )
    if args.rope_dims % 2:
        raise ConfigError(f"{source}: head_dim * partial_rotary_factor must be even, not {args.rope_dims}")


_REQUIRED = (
    "vocab_size", "hidden_size", "num_key_value_heads", "linear_num_key_heads",
    "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
# Integer fields and their least valid value (head_dim 0 or null means hidden_size // heads).
_INT_MIN = {
    **dict.fromkeys(_REQUIRED, 1), "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 0,
    "linear_conv_kernel_dim": 1, "full_attention_interval": 1, "max_position_embeddings": 1,
    "intermediate_size": 0, "mtp_num_hidden_layers": 0,
}


def _hashable(value: Any) -> bool:
    return isinstance(value, (str, int, float, type(None)))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, name: str, source: str, above: float, at_most: Optional[float]) -> float:
    """A finite number > ``above`` (and <= ``at_most``), as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= above or (at_most is not None and value > at_most):
        bound = f" and at most {at_most:g}" if at_most is not None else ""
        raise ConfigError(f"{source}: {name} must be a number above {above:g}{bound}, not {value!r}")
    return float(value)


def _check_fields(t: Dict[str, Any], source: str) -> None:
    """Types and ranges of the fields the model is built from, so no bad value reaches a forward pass."""
    for name, least in _INT_MIN.items():
        value = t.get(name)
        if value is None and name not in _REQUIRED and name not in ("num_hidden_layers", "num_attention_heads"):
            continue
        if not _is_int(value) or value < least or value > 1 << 31:
            raise ConfigError(f"{source}: {name} must be an integer from {least} to 2^31, not {value!r}")
    _number(t.get("rms_norm_eps", 1e-6), "rms_norm_eps", source, 0.0, 1.0)
    mlp_only = t.get("mlp_only_layers", [])
    if not isinstance(mlp_only, list) or not all(_is_int(i) for i in mlp_only):
        raise ConfigError(f"{source}: mlp_only_layers must be a list of layer indices")


def read_config(model_dir: Path) -> Dict[str, Any]:
    """The parsed ``config.json`` of a model directory, with a one-line error if unusable."""
    path = Path(model_dir) / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (a model directory needs config.json)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a JSON file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def quantization_of(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """mlx-lm's ``quantization`` section (also accepted under ``quantization_config``)."""
    q = config.get("quantization") or config.get("quantization_config")
    if q and "bits" in q and "group_size" in q:
        return q
    return None
