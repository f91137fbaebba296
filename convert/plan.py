"""What a conversion writes: every output tensor with its bits, group size and bytes.

The tensor inventory comes from ``Model`` itself (built lazily, so nothing is allocated),
so the plan names and shapes are exactly the parameters our loader and mlx-lm's expect.

Recipe rules
------------
* Default (``bits``/``group_size``, affine): every linear layer, the switch (routed expert)
  layers, the embedding and the head at ``bits``; the small gating projections (router
  ``checkpoint.EIGHT_BIT_MODULES``) at 8 bits; norms, ``conv1d``, ``A_log`` and ``dt_bias``
  stay float (``checkpoint.keeps_float32``: ``A_log`` in float32). MTP tensors follow
  the same rules.
* Group-size fallback: a tensor whose input dimension the group size does not divide takes
  the largest smaller supported group (64, then 32) that does; if none does, it stays float.
* Fit (``fit=RAM``): weights + cache for ``context`` tokens + ``reserve`` must stay under the
  macOS working-set limit for that RAM (``memory.working_set_limit``). The tiers of ``FIT_TIERS``
  are tried from best to smallest; the first that fits is the base, then whole units (the
  globals, then decoder layers from both ends inwards, then the MTP layers) are raised to the
  tier above while the total still fits, so the budget is used rather than left over.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from mlx.utils import tree_flatten

from mlx_qwenmoe.checkpoint import EIGHT_BIT_GROUP_SIZE, is_eight_bit, keeps_float32
from mlx_qwenmoe.config import ModelArgs
from mlx_qwenmoe.errors import ConfigError
from mlx_qwenmoe.model import Model

from .memory import GiB, cache_bytes, parse_size, working_set_limit

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (128, 64, 32)
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_CONTEXT = 32768
DEFAULT_RESERVE = GiB // 2  # activations of a prefill chunk, logits, allocator slack

# Tensor kinds, in the order the plan prints them.
KINDS = ("experts", "shared_expert", "attention", "deltanet", "dense", "gates", "embedding", "head", "float")
_DENSE_KINDS = ("shared_expert", "attention", "deltanet", "dense")

Quant = Optional[Tuple[int, int]]  # (bits, group_size), None: keep float
Recipe = Dict[str, Quant]


def _tier(experts: Tuple[int, int], dense: int, embedding: int, head: int) -> Recipe:
    recipe: Recipe = {k: (dense, 64) for k in _DENSE_KINDS}
    recipe.update(experts=experts, embedding=(embedding, 64), head=(head, 64), gates=(8, EIGHT_BIT_GROUP_SIZE), float=None)
    return recipe


# Best first. The routed experts are ~95% of the weights of the A3B/A10B models, so each
# step lowers them first and the per-token-sensitive embedding/head last.
FIT_TIERS: Tuple[Recipe, ...] = (
    _tier((8, 64), 8, 8, 8),
    _tier((6, 64), 8, 8, 8),
    _tier((5, 64), 6, 8, 8),
    _tier((4, 64), 6, 6, 8),
    _tier((4, 64), 4, 6, 6),
    _tier((3, 64), 4, 6, 6),
    _tier((3, 64), 4, 4, 6),
    _tier((3, 128), 4, 4, 6),
)


@dataclass(frozen=True)
class TensorPlan:
    """One parameter of the model as written: float, or affine-quantized with ``bits``/``group_size``."""

    name: str
    shape: Tuple[int, ...]
    kind: str
    unit: str  # "globals", "layers.N" or "mtp.layers.N": the unit the fit raises or lowers together
    dtype: str  # float dtype of the tensor, or of its scales and biases when quantized
    bits: Optional[int] = None
    group_size: Optional[int] = None

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def outputs(self) -> List[Tuple[str, Tuple[int, ...], str]]:
        """The tensors written for this parameter: (name, shape, dtype)."""
        if self.bits is None:
            return [(self.name, self.shape, self.dtype)]
        *lead, d = self.shape
        return [
            (self.name, (*lead, d * self.bits // 32), "uint32"),
            (f"{self.module}.scales", (*lead, d // self.group_size), self.dtype),
            (f"{self.module}.biases", (*lead, d // self.group_size), self.dtype),
        ]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * _itemsize(dtype) for _, shape, dtype in self.outputs)


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "uint32" else DTYPES[dtype]


@dataclass
class Plan:
    """The tensors a conversion writes and the memory they take on the target machine."""

    model_type: str
    num_layers: int
    mtp_layers: int
    dtype: str
    bits: int  # the default written to config.json's ``quantization``
    group_size: int
    tensors: List[TensorPlan]
    context: int
    cache_bytes: int
    reserve_bytes: int
    ram_bytes: Optional[int] = None  # set in fit mode
    recipe: str = ""
    _by_name: Dict[str, TensorPlan] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def __getitem__(self, name: str) -> TensorPlan:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def working_set_bytes(self) -> Optional[int]:
        return None if self.ram_bytes is None else working_set_limit(self.ram_bytes)

    @property
    def headroom_bytes(self) -> Optional[int]:
        limit = self.working_set_bytes
        return None if limit is None else limit - self.weight_bytes - self.cache_bytes - self.reserve_bytes

    def quantization_config(self) -> Dict[str, Any]:
        """config.json's ``quantization``: the default, plus an entry per module that differs."""
        config: Dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        for t in self.tensors:
            if t.bits is not None and (t.bits, t.group_size) != (self.bits, self.group_size):
                config[t.module] = {"group_size": t.group_size, "bits": t.bits}
        return config

    def summary(self) -> str:
        return _format(self)


def _inventory(args: ModelArgs, mtp_layers: int) -> List[Tuple[str, Tuple[int, ...], bool]]:
    """(parameter name, shape, quantizable) for every parameter of ``Model``, in module order."""
    model = Model(replace(args, mtp_num_hidden_layers=mtp_layers), with_mtp=mtp_layers > 0)
    quantizable = {
        f"{path}.weight" for path, module in model.named_modules() if hasattr(module, "to_quantized")
    }
    return [(name, tuple(a.shape), name in quantizable) for name, a in tree_flatten(model.parameters())]


def _kind(name: str, quantizable: bool) -> str:
    module = name.rsplit(".", 1)[0]
    if not quantizable:
        return "float"
    if is_eight_bit(module):
        return "gates"
    for marker, kind in ((".switch_mlp.", "experts"), (".shared_expert.", "shared_expert"), (".self_attn.", "attention"),
                         (".linear_attn.", "deltanet"), ("embed_tokens", "embedding"), ("lm_head", "head")):
        if marker in name:
            return kind
    return "dense"


def _unit(name: str) -> str:
    m = re.search(r"(?:^|\.)((?:mtp\.)?layers\.\d+)\.", name)
    return m.group(1) if m else "globals"


def _group_for(in_dim: int, group_size: int) -> Optional[int]:
    """The fallback rule: the requested group, else the largest smaller supported one dividing in_dim."""
    return next((g for g in GROUP_SIZES if g <= group_size and in_dim % g == 0), None)


def _tensor(name: str, shape: Tuple[int, ...], kind: str, unit: str, dtype: str, quant: Quant) -> TensorPlan:
    if keeps_float32(name):
        dtype = "float32"
    group = _group_for(shape[-1], quant[1]) if quant else None
    if group is None:
        return TensorPlan(name, shape, kind, unit, dtype)
    return TensorPlan(name, shape, kind, unit, dtype, quant[0], group)


def config_dtype(config: Dict[str, Any]) -> str:
    text = config.get("text_config", {})
    for c in (text, config):
        for key in ("dtype", "torch_dtype"):
            if c.get(key) in DTYPES:
                return c[key]
    return "bfloat16"


def _check_options(bits: int, group_size: int, dtype: str, context: int) -> None:
    if bits not in BITS:
        raise ConfigError(f"bits {bits}: supported are {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size {group_size}: supported are {', '.join(map(str, GROUP_SIZES))}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype}: supported are {', '.join(DTYPES)}")
    if context < 0:
        raise ConfigError(f"context {context}: must not be negative")


def plan_conversion(
    config: Dict[str, Any],
    *,
    bits: int = 4,
    group_size: int = 64,
    fit: Union[None, int, str] = None,
    context: int = DEFAULT_CONTEXT,
    reserve: Union[int, str] = DEFAULT_RESERVE,
    dtype: Optional[str] = None,
    mtp_layers: Optional[int] = None,
    source: str = "config.json",
) -> Plan:
    """Plan the conversion of a model with this (Hugging Face or mlx-lm) ``config``.

    ``fit``: RAM of the target Mac (bytes or a size such as "24GB"); chooses per-tensor bits so
    that weights + the cache for ``context`` tokens + ``reserve`` fit its working-set limit.
    Otherwise the default recipe at ``bits``/``group_size``. ``dtype``: float dtype of unquantized
    tensors and of scales/biases (default: the config's). ``mtp_layers``: MTP layers to include
    (default: the config's ``mtp_num_hidden_layers``).
    """
    args = ModelArgs.from_config(config, source=source)
    dtype = dtype or config_dtype(config)
    _check_options(bits, group_size, dtype, context)
    mtp = args.mtp_num_hidden_layers if mtp_layers is None else mtp_layers
    cache = cache_bytes(args, context, DTYPES[dtype], mtp)
    reserve_bytes = parse_size(reserve, "reserve") if isinstance(reserve, str) else int(reserve)
    params = [(n, s, _kind(n, q), _unit(n)) for n, s, q in _inventory(args, mtp)]

    def build(recipe_of: Callable[[str], Recipe]) -> List[TensorPlan]:
        return [_tensor(n, s, k, u, dtype, recipe_of(u)[k]) for n, s, k, u in params]

    common = dict(model_type=args.model_type, num_layers=args.num_hidden_layers, mtp_layers=mtp, dtype=dtype,
                  context=context, cache_bytes=cache, reserve_bytes=reserve_bytes)
    if fit is None:
        recipe = {k: (8, EIGHT_BIT_GROUP_SIZE) if k == "gates" else (bits, group_size) for k in KINDS}
        recipe["float"] = None
        return Plan(bits=bits, group_size=group_size, tensors=build(lambda _u: recipe),
                    recipe=f"{bits}-bit, group {group_size}", **common)

    ram = parse_size(fit, "fit", unit_required=True) if isinstance(fit, str) else int(fit)
    budget = working_set_limit(ram) - cache - reserve_bytes
    tiers = _fit_tiers(params, dtype, build, budget)
    if tiers is None:
        smallest = sum(t.nbytes for t in build(lambda _u: FIT_TIERS[-1]))
        raise ConfigError(
            f"fit {fit}: does not fit: weights take at least {smallest / GiB:.2f} GiB (3-bit experts), "
            f"the cache for {context} tokens {cache / GiB:.2f} GiB and the reserve {reserve_bytes / GiB:.2f} GiB, "
            f"but the working-set limit is {working_set_limit(ram) / GiB:.2f} GiB"
        )
    tensors = build(lambda u: FIT_TIERS[tiers[u]])
    experts = [t for t in tensors if t.kind == "experts" and t.bits] or [t for t in tensors if t.bits]
    default = max({(t.bits, t.group_size) for t in experts}, key=lambda q: sum(t.params for t in experts if (t.bits, t.group_size) == q))
    return Plan(bits=default[0], group_size=default[1], tensors=tensors, ram_bytes=ram,
                recipe=f"fit {ram / GiB:g} GiB RAM", **common)


def _fit_tiers(params: list, dtype: str, build: Callable, budget: int) -> Optional[Dict[str, int]]:
    """Tier index per unit: the best uniform tier that fits, then units raised one tier while it fits."""
    units = list(dict.fromkeys(u for *_, u in params))
    cost = []  # cost[tier][unit]
    for recipe in FIT_TIERS:
        per_unit: Dict[str, int] = dict.fromkeys(units, 0)
        for t in build(lambda _u, r=recipe: r):
            per_unit[t.unit] += t.nbytes
        cost.append(per_unit)
    base = next((i for i, c in enumerate(cost) if sum(c.values()) <= budget), None)
    if base is None:
        return None
    tiers = dict.fromkeys(units, base)
    if base == 0:
        return tiers
    total = sum(cost[base].values())
    for u in _raise_order(units):
        extra = cost[base - 1][u] - cost[base][u]
        if total + extra <= budget:
            tiers[u], total = base - 1, total + extra
    return tiers


def _raise_order(units: List[str]) -> List[str]:
    """Globals first (embedding and head are read for every token), then decoder layers from
    both ends inwards (the first and last layers are the most sensitive to quantization, as
    mlx-lm's mixed recipes also assume), the MTP layers last."""
    layers = [u for u in units if u.startswith("layers.")]
    n = len(layers)
    order = sorted(range(n), key=lambda i: (min(i, n - 1 - i), i))
    return [u for u in units if u == "globals"] + [layers[i] for i in order] + [u for u in units if u.startswith("mtp.")]


def _describe(tensors: List[TensorPlan]) -> str:
    quants = sorted({(t.bits, t.group_size) for t in tensors}, key=lambda q: (q[0] is None, q))
    return ", ".join(f"{b}b/g{g}" if b else "float" for b, g in quants)


def _layer_ranges(units: List[str]) -> str:
    nums = [int(u.rsplit(".", 1)[1]) for u in units]
    spans, start = [], nums[0]
    for a, b in zip(nums, nums[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    prefix = "mtp layers " if units[0].startswith("mtp.") else "layers "
    return prefix + ",".join(spans)


def _format(plan: Plan) -> str:
    lines = [
        f"Plan: {plan.model_type}, {plan.num_layers} layers + {plan.mtp_layers} MTP, {plan.dtype}, recipe: {plan.recipe}",
        f"{'kind':<14}{'tensors':>8}{'params':>16}  {'bits/group':<22}{'GiB':>9}{'bits/weight':>12}",
    ]
    for kind in KINDS:
        ts = [t for t in plan.tensors if t.kind == kind]
        if ts:
            n, b = sum(t.params for t in ts), sum(t.nbytes for t in ts)
            lines.append(f"{kind:<14}{len(ts):>8}{n:>16,}  {_describe(ts):<22}{b / GiB:>9.3f}{8 * b / n:>12.2f}")
    # Which layers got which bits, consecutive layers with the same recipe on one line.
    sig: Dict[str, str] = {}
    for unit in dict.fromkeys(t.unit for t in plan.tensors):
        ts = [t for t in plan.tensors if t.unit == unit and t.kind != "float"]
        sig[unit] = "; ".join(f"{k} {_describe([t for t in ts if t.kind == k])}" for k in KINDS if any(t.kind == k for t in ts))
    groups: Dict[Tuple[bool, str], List[str]] = {}
    for unit, s in sig.items():
        groups.setdefault((unit.startswith("mtp."), s), []).append(unit)
    for (_, s), units in groups.items():
        label = "globals" if units == ["globals"] else _layer_ranges(units)
        lines.append(f"  {label}: {s}")
    w, c = plan.weight_bytes, plan.cache_bytes
    lines.append(f"weights   {w / GiB:9.3f} GiB  ({w:,} bytes, {8 * w / plan.params:.2f} bits/weight)")
    lines.append(f"cache     {c / GiB:9.3f} GiB  ({plan.context} tokens)")
    lines.append(f"total     {(w + c) / GiB:9.3f} GiB  (weights + cache)")
    if plan.ram_bytes is not None:
        lines.append(f"reserve   {plan.reserve_bytes / GiB:9.3f} GiB  (activations, allocator slack)")
        lines.append(f"limit     {plan.working_set_bytes / GiB:9.3f} GiB  (macOS working set of {plan.ram_bytes / GiB:g} GiB RAM)")
        lines.append(f"headroom  {plan.headroom_bytes / GiB:9.3f} GiB")
    return "\n".join(lines)


