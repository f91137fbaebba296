"""Checkpoint tensor names and layouts: Hugging Face (and Qwen3-Next) to mlx-lm's layout.

Pure functions over ``{name: array}``; the converter applies them one layer at a
time, the loader to a whole checkpoint. Works on numpy or MLX arrays alike
(only slicing, ``reshape``, ``concatenate``/``stack`` and ``+`` are used).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .config import ModelArgs
from .errors import CheckpointError

VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")

# Zero-centred RMSNorms (x * (1 + w)) in the checkpoint; we store 1 + w. The gated
# norm inside DeltaNet (linear_attn.norm) is a plain x * w and is not listed.
OFFSET_NORM_SUFFIXES = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)
OFFSET_NORM_KEYS = (
    "language_model.model.norm.weight",
    "mtp.norm.weight",
    "mtp.pre_fc_norm_embedding.weight",
    "mtp.pre_fc_norm_hidden.weight",
)

# The small projections that choose experts or set the DeltaNet decay get 8 bits whatever the
# recipe: together they are under 0.1% of the weights, and 4-bit noise there moves routing
# decisions and exp(-exp(A_log) * softplus(a)) for every token. mlx-lm's qwen3_5_moe recipe
# names the two routers; we add DeltaNet's a/b projections, in the model's quant_predicate too,
# so ``mlx_lm.convert`` of our model and our converter quantize alike.
EIGHT_BIT_MODULES = ("mlp.gate", "shared_expert_gate", "linear_attn.in_proj_a", "linear_attn.in_proj_b")
EIGHT_BIT_GROUP_SIZE = 64

_PER_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_GATE_UP = re.compile(r"^(.*\.mlp)\.experts\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"^(.*\.mlp)\.experts\.down_proj$")
_QKVZ = re.compile(r"^(.*\.linear_attn)\.in_proj_(qkvz|ba)\.(weight|scales|biases)$")


def is_eight_bit(module_path: str) -> bool:
    """Whether a quantized module is one of ``EIGHT_BIT_MODULES`` (always 8 bits)."""
    return module_path.endswith(EIGHT_BIT_MODULES)


def keeps_float32(name: str) -> bool:
    """Tensors stored and run in float32 whatever the model dtype: exp(A_log) must neither
    overflow in float16 nor lose the precision of the decay in bfloat16."""
    return name.endswith("A_log")


def is_vision_key(key: str) -> bool:
    return key.startswith(VISION_PREFIXES)


def per_expert_key(key: str) -> Optional[Tuple[str, int, str]]:
    """(mlp prefix, expert index, projection) of a per-expert tensor name, else None."""
    m = _PER_EXPERT.match(rename(key))
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def rows_independent(key: str) -> bool:
    """Whether ``hf_to_mlx`` of rows a:b (axis 0) of this tensor gives rows a:b of its mapping.

    True except for Qwen3-Next's fused projections, whose rows are regrouped across heads;
    a streaming converter can then map big tensors in row chunks.
    """
    return not _QKVZ.match(rename(key))


def rename(key: str) -> str:
    """Hugging Face tensor name -> mlx-lm name (mlx-lm names pass through)."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key.startswith(("model.", "lm_head.")):
        return "language_model." + key
    return key


def _concat(parts: List[Any]) -> Any:
    return mx.concatenate(parts, axis=0) if isinstance(parts[0], mx.array) else np.concatenate(parts, axis=0)


def _stack(parts: List[Any]) -> Any:
    return mx.stack(parts) if isinstance(parts[0], mx.array) else np.stack(parts)


def _split_qwen3_next(key: str, kind: str, suffix: str, value: Any, args: ModelArgs) -> Dict[str, Any]:
    """Qwen3-Next fuses [q k v z] and [b a] per key-head group; split into our separate projections.

    Only rows are permuted, so quantized weights, scales and biases split the same way.
    """
    nk, dk, dv = args.linear_num_key_heads, args.linear_key_head_dim, args.linear_value_head_dim
    r = args.linear_num_value_heads // nk
    rows = value.reshape(nk, -1, *value.shape[1:])
    if kind == "qkvz":
        bounds = np.cumsum([dk, dk, r * dv])
        q, k, v, z = (rows[:, s:e] for s, e in zip((0, *bounds), (*bounds, rows.shape[1])))
        flat = [t.reshape(-1, *value.shape[1:]) for t in (q, k, v, z)]
        return {f"{key}.in_proj_qkv.{suffix}": _concat(flat[:3]), f"{key}.in_proj_z.{suffix}": flat[3]}
    b, a = rows[:, :r], rows[:, r:]
    return {
        f"{key}.in_proj_b.{suffix}": b.reshape(-1, *value.shape[1:]),
        f"{key}.in_proj_a.{suffix}": a.reshape(-1, *value.shape[1:]),
    }


def _stack_experts(groups: Dict[Tuple[str, str], Dict[int, Any]], num_experts: int) -> Dict[str, Any]:
    out = {}
    for (prefix, proj), per_expert in groups.items():
        missing = [e for e in range(num_experts) if e not in per_expert]
        if missing:
            raise CheckpointError(
                f"tensor {prefix}.experts.{missing[0]}.{proj}.weight is missing "
                f"({len(per_expert)} of {num_experts} experts of {prefix} present)"
            )
        shape = tuple(per_expert[0].shape)
        odd = next((e for e in range(num_experts) if tuple(per_expert[e].shape) != shape), None)
        if odd is not None:
            raise CheckpointError(
                f"tensor {prefix}.experts.{odd}.{proj}.weight has shape {tuple(per_expert[odd].shape)}, "
                f"expert 0's is {shape}"
            )
        out[f"{prefix}.switch_mlp.{proj}.weight"] = _stack([per_expert[e] for e in range(num_experts)])
    return out


def hf_to_mlx(weights: Dict[str, Any], args: ModelArgs, *, from_hf: bool) -> Dict[str, Any]:
    """Rename and re-lay tensors for ``Model``.

    ``from_hf`` marks tensors straight from a Hugging Face checkpoint: conv1d weights
    are moved to MLX's (C, K, 1) layout and offset norms get their +1. Expert
    tensors, fused or per expert, become ``switch_mlp.{gate,up,down}_proj``; all of a
    layer's experts must be in ``weights`` together. Vision tensors are dropped.
    """
    out: Dict[str, Any] = {}
    experts: Dict[Tuple[str, str], Dict[int, Any]] = defaultdict(dict)
    spelled: Dict[str, str] = {}
    for key, value in weights.items():
        if is_vision_key(key):
            continue
        source, key = key, rename(key)
        if key in spelled:  # e.g. model.layers.0.x and model.language_model.layers.0.x: one would silently win
            raise CheckpointError(f"tensors {spelled[key]} and {source} are the same parameter")
        spelled[key] = source
        if m := _PER_EXPERT.match(key):
            experts[(m.group(1), m.group(3))][int(m.group(2))] = value
        elif m := _FUSED_GATE_UP.match(key):
            mid = value.shape[-2] // 2
            out[f"{m.group(1)}.switch_mlp.gate_proj.weight"] = value[..., :mid, :]
            out[f"{m.group(1)}.switch_mlp.up_proj.weight"] = value[..., mid:, :]
        elif m := _FUSED_DOWN.match(key):
            out[f"{m.group(1)}.switch_mlp.down_proj.weight"] = value
        elif m := _QKVZ.match(key):
            out.update(_split_qwen3_next(m.group(1), m.group(2), m.group(3), value, args))
        elif from_hf and key.endswith("conv1d.weight") and value.ndim == 3:
            out[key] = value.swapaxes(1, 2)
        elif from_hf and value.ndim == 1 and (key.endswith(OFFSET_NORM_SUFFIXES) or key in OFFSET_NORM_KEYS):
            out[key] = value + 1.0
        else:
            out[key] = value
    out.update(_stack_experts(experts, args.num_experts))
    if args.tie_word_embeddings:
        out.pop("language_model.lm_head.weight", None)
    return out


def layer_groups(names: Iterable[str]) -> Dict[str, List[str]]:
    """Group tensor names by the unit that must be mapped together (a decoder layer, or 'globals').

    Experts of one layer are stacked together, so a streaming converter maps a group at a time.
    """
    groups: Dict[str, List[str]] = defaultdict(list)
    for name in names:
        m = re.match(r"^(.*?layers\.\d+)\.", rename(name))
        groups[m.group(1) if m else "globals"].append(name)
    return dict(groups)
