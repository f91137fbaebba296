"""Graph statistics of one decode step: operations and bytes moved, ours vs mlx-lm.

Three tables: the MoE block alone (ours vs mlx-lm's ``Qwen3NextSparseMoeBlock``),
a whole decode step of a 4-layer model (ours vs mlx-lm's ``qwen3_5_moe``), and that
step batched over 8 sequences (continuous batching: mlx-lm's batch caches, ours and
mlx-lm's), per generated token against one sequence,
both on the real Qwen3.5-35B-A3B layer shapes (hidden 2048, 256 experts top-8,
expert and shared intermediate 512), quantized as ``mlx_qwenmoe convert --bits 4``
writes it (4-bit group 64; routers and DeltaNet a/b 8-bit), bfloat16 activations, one token.

Counted from the lazy graph, not timed, so the numbers hold for a Mac while
running anywhere: ``mx.export_function`` reports every primitive with its input
and output shapes. Metal is what the trace is made to see (``mx.metal`` present,
GPU default device), and three things a CPU build cannot show are rebuilt in it,
each as one fused node (a ``Depends`` on placeholders, tagged with its label):
* a ``mx.fast.metal_kernel`` launch, ours or mlx-lm's gated delta: one dispatch
  reading the kernel's inputs and writing its outputs;
* an ``mx.compile``'d function (``swiglu``, ``nn.silu``, ...), which the trace
  inlines but Metal runs as one kernel; their number is checked against the
  ``Compiled`` nodes of ``mx.export_to_dot``;
* an ``mx.fast`` op (``rms_norm``, ``rope``, attention) or ``mx.dequantize``
  (the quantized embedding), one kernel on Metal that the CPU build expands
  into its fallback ops.

"ops" counts every primitive; "dispatches" leaves out views that move no data
on Metal (reshape, broadcast, slice, ...). Bytes: each dispatch reads its inputs
(a stacked expert tensor only for the top-k experts it selects, a lookup table
only for its rows) and writes its outputs; "activations written" leaves out the
step's final output. Constant inputs (weights, and in the whole step the caches)
are counted apart from activations.

    nice python benchmarks/bench_graph.py      # ~2 minutes, ~2 GB of memory
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple


import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from common import cache_state, default_plan, hf_config, machine_report, quantize_as_planned, table  # noqa: E402
from mlx.utils import tree_flatten, tree_map_with_path  # noqa: E402
from mlx_lm.models import gated_delta, qwen3_5_moe, qwen3_next, switch_layers  # noqa: E402

from mlx_qwenmoe import kernels  # noqa: E402
from mlx_qwenmoe.checkpoint import keeps_float32  # noqa: E402
from mlx_qwenmoe.convert.plan import Plan  # noqa: E402
from mlx_qwenmoe import model as model_module  # noqa: E402
from mlx_qwenmoe.ops import gated_delta as gated_delta_ops  # noqa: E402
from mlx_qwenmoe.ops.gated_delta import reference as gated_delta_reference  # noqa: E402
from mlx_qwenmoe.config import ModelArgs  # noqa: E402
from mlx_qwenmoe.model import Model, SparseMoeBlock  # noqa: E402
from mlx_qwenmoe.ops import moe  # noqa: E402

VIEWS = {"Reshape", "ExpandDims", "Squeeze", "Broadcast", "Slice", "StopGradient", "Depends", "Transpose", "AsStrided"}
GATHERS = ("GatherQMM", "GatherMM")  # read stacked experts by index
ROW_GATHERS = ("Gather", "GatherAxis")  # read rows of their first input by index


@dataclass
class Node:
    name: str
    inputs: List[Tuple[str, Tuple[int, ...], Any]]
    outputs: List[Tuple[str, Tuple[int, ...], Any]]


@dataclass
class Stats:
    ops: int = 0
    dispatches: int = 0
    weight_bytes: int = 0
    act_read: int = 0
    act_written: int = 0
    kinds: Dict[str, int] = field(default_factory=dict)


def _nbytes(shape: Sequence[int], dtype: Any) -> int:
    return math.prod(shape) * dtype.size


# --- fused nodes: metal_kernel launches and compiled functions --------------------------------

_FUSED: List[str] = []  # label of each fused node, indexed by its tag constant


def _fused_node(label: str, inputs: Sequence[mx.array], shapes: Sequence[Sequence[int]], dtypes: Sequence[Any]) -> List[mx.array]:
    """One node reading ``inputs`` and writing arrays of ``shapes``: ``Depends`` on placeholders plus a tag."""
    _FUSED.append(label)
    tag = mx.array(len(_FUSED) - 1, dtype=mx.int32)
    placeholders = [mx.zeros(tuple(s), d) for s, d in zip(shapes, dtypes)]
    arrays = [a if isinstance(a, mx.array) else mx.array(a) for a in inputs]  # metal_kernel takes Python scalars too
    return mx.depends(placeholders, [tag, *arrays])


def _fake_metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], **_kwargs: Any) -> Callable:
    def launch(*, inputs, output_shapes, output_dtypes, **_launch: Any) -> List[mx.array]:
        return _fused_node(f"kernel {name}", inputs, output_shapes, output_dtypes)

    return launch


def _fused_function(label: str, fn: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> mx.array:
        shape_probe = fn(*args, **kwargs)  # built lazily and never evaluated: only its shape and dtype are used
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)]
        return _fused_node(label, inputs, [shape_probe.shape], [shape_probe.dtype])[0]

    return call


# mx.compile'd functions the models call, by the module attribute they are looked up through.
COMPILED = [
    (switch_layers, "swiglu"), (qwen3_next, "swiglu"), (qwen3_next, "precise_swiglu"),
    (gated_delta, "compute_g"), (nn, "silu"), (nn, "softplus"),
    (model_module, "precise_swiglu"), (model_module, "sigmoid_gate"), (gated_delta_ops, "decay_and_beta"),
    (gated_delta_reference, "recurrent_step"),
]
# Ops that are one kernel each on Metal but that the CPU build expands into their fallback ops.
FAST = [(mx.fast, name) for name in ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")]
FAST.append((mx, "dequantize"))


@contextlib.contextmanager
def patched(metal: bool, fuse_compiled: bool) -> Iterator[None]:
    """Metal as a Mac would see it (kernels for ours and for mlx-lm's gated delta), fused nodes as asked."""
    saved: List[Tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    for module, name in FAST:
        patch(module, name, _fused_function(f"fast {name}", getattr(module, name)))
    if metal:
        # What a Mac runs once each kernel has passed its first-use check against its twin.
        patch(kernels, "verified", lambda _kernel, _variant, _check: True)
        patch(mx.fast, "metal_kernel", _fake_metal_kernel)
        patch(mx.metal, "is_available", lambda: True)
        patch(mx, "default_device", lambda: mx.Device(mx.gpu))
    kernels.build.cache_clear()
    importlib.reload(gated_delta)  # mlx-lm builds its kernels at import, when Metal is there
    if fuse_compiled:
        for module, attr in COMPILED:
            patch(module, attr, _fused_function(f"compiled {attr}", getattr(module, attr)))
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
        kernels.build.cache_clear()
        importlib.reload(gated_delta)


# --- tracing and counting ---------------------------------------------------------------------


@dataclass
class Graph:
    nodes: List[Node] = field(default_factory=list)
    constants: Dict[str, Any] = field(default_factory=dict)
    outputs: set = field(default_factory=set)


def trace(fn: Callable[[mx.array], mx.array], x: mx.array) -> Graph:
    graph = Graph()

    def record(d: Dict[str, Any]) -> None:
        if d["type"] == "primitive":
            graph.nodes.append(Node(d["name"], d["inputs"], d["outputs"]))
        elif d["type"] == "constants":
            graph.constants.update(dict(d["constants"]))
        elif d["type"] == "outputs":
            graph.outputs.update(o[0] for o in d["outputs"])

    mx.export_function(record, fn, x)
    return graph


def compiled_nodes_in_dot(fn: Callable[[mx.array], mx.array], x: mx.array) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.dot")
        mx.export_to_dot(path, fn(x))
        return len(re.findall(r'label ="Compiled', Path(path).read_text()))


def count(graph: Graph, num_experts: int, experts_read: int) -> Stats:
    """``experts_read``: how many of a stacked expert tensor's experts one gather reads."""
    nodes, constants = graph.nodes, graph.constants
    producer = {o[0]: n for n in nodes for o in n.outputs}
    # Placeholders of fused nodes and everything that only built them are not part of the graph.
    dead = set()
    for n in nodes:
        if n.name == "Depends":
            stack = [i[0] for i in n.inputs[: len(n.outputs)]]
            while stack:
                p = producer.get(stack.pop())
                if p is not None and id(p) not in dead:
                    dead.add(id(p))
                    stack.extend(i[0] for i in p.inputs)
    # The step's output, and what views of it were made from, is not an intermediate.
    final, stack = set(), list(graph.outputs)
    while stack:
        name = stack.pop()
        final.add(name)
        p = producer.get(name)
        if p is not None and p.name in VIEWS and p.name != "Depends":
            stack.extend(i[0] for i in p.inputs)
    stats = Stats()
    for n in nodes:
        if id(n) in dead:
            continue
        label, inputs = n.name, n.inputs
        if n.name == "Depends":
            tag = inputs[len(n.outputs)]
            label = _FUSED[int(constants[tag[0]].item())]
            inputs = inputs[len(n.outputs) + 1:]
        stats.ops += 1
        if label in VIEWS:
            continue
        stats.dispatches += 1
        stats.kinds[label] = stats.kinds.get(label, 0) + 1
        if label == "SliceUpdate":  # in place on Metal (the buffer is donated): moves only the update
            update = _nbytes(*inputs[1][1:])
            stats.act_read += update
            stats.act_written += update
            continue
        gathers = label in GATHERS or label.startswith("kernel")
        for name, shape, dtype in inputs:
            b = _nbytes(shape, dtype)
            if name not in constants:
                stats.act_read += b
                continue
            if label in ROW_GATHERS and name == inputs[0][0]:
                b = sum(_nbytes(s, d) for _, s, d in n.outputs)  # only the looked-up rows
            elif gathers and len(shape) == 3 and shape[0] == num_experts:
                b = b * experts_read // num_experts  # decode tokens read only their top-k experts
            stats.weight_bytes += b
        stats.act_written += sum(_nbytes(s, d) for nm, s, d in n.outputs if nm not in final)
    return stats


# --- the blocks -------------------------------------------------------------------------------


def _concrete(module: nn.Module, plan: Plan, dtype: mx.Dtype, prefix: str = "") -> nn.Module:
    """Quantized as the converter's ``plan`` says, with concrete zeros for every parameter (the
    graph does not depend on values)."""
    quantize_as_planned(module, plan, prefix)
    keep = lambda path, p: p.dtype == mx.uint32 or keeps_float32(path)  # noqa: E731
    module.update(tree_map_with_path(lambda path, p: mx.zeros(p.shape, p.dtype if keep(path, p) else dtype), module.parameters()))
    mx.eval(module.parameters())
    return module


def blocks(args: ModelArgs, plan: Plan, dtype: mx.Dtype) -> Tuple[nn.Module, nn.Module]:
    prefix = "language_model.model.layers.0.mlp."
    ours = _concrete(SparseMoeBlock(args), plan, dtype, prefix)
    # The block reads only these fields of mlx-lm's ModelArgs.
    theirs_args = SimpleNamespace(
        hidden_size=args.hidden_size, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size, norm_topk_prob=args.norm_topk_prob,
        shared_expert_intermediate_size=args.shared_expert_intermediate_size,
    )
    theirs = _concrete(qwen3_next.Qwen3NextSparseMoeBlock(theirs_args), plan, dtype, prefix)
    return ours, theirs


def models(config: Dict[str, Any], plan: Plan, dtype: mx.Dtype) -> Tuple[nn.Module, nn.Module]:
    """Our model and mlx-lm's ``qwen3_5_moe`` on the same (zero) arrays."""
    theirs = _concrete(qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(config)), plan, dtype)
    ours = Model(ModelArgs.from_config(config))
    quantize_as_planned(ours, plan)
    ours.load_weights(tree_flatten(theirs.parameters()), strict=True)
    # As mlx-lm's loader leaves it: in training mode mlx-lm's DeltaNet skips its Metal kernel.
    ours.eval()
    theirs.eval()
    return ours, theirs


def fused_shared(block: SparseMoeBlock, x: mx.array) -> mx.array:
    """Our block with the shared expert handed to ``routed_experts`` (the proposed model wiring)."""
    weights, inds = moe.route(block.gate(x), block.top_k, block.norm_topk_prob)
    return moe.routed_experts(x, inds, weights, block.switch_mlp, block.shared_expert, block.shared_expert_gate)


@contextlib.contextmanager
def shared_fused_wiring() -> Iterator[None]:
    original = SparseMoeBlock.__call__
    SparseMoeBlock.__call__ = fused_shared
    try:
        yield
    finally:
        SparseMoeBlock.__call__ = original


def decode_step(model: nn.Module) -> Callable[[], Callable[[mx.array], mx.array]]:
    """Fresh one-token decode steps, each from a cache that already holds one (evaluated) token."""

    def make() -> Callable[[mx.array], mx.array]:
        cache = model.make_cache()
        mx.eval(model(mx.array([[1]]), cache=cache))
        mx.eval(cache_state(cache))
        return lambda tokens: model(tokens, cache=cache)

    return make


def batched_decode_step(model: nn.Module, batch: int) -> Callable[[], Callable[[mx.array], mx.array]]:
    """``decode_step`` for ``batch`` sequences in mlx-lm's batch caches (``merge`` of each
    layer's empty caches, as mlx-lm's BatchGenerator starts), after a one-token prompt each."""

    def make() -> Callable[[mx.array], mx.array]:
        cache = [type(c).merge([c] * batch) for c in model.make_cache()]
        model(mx.ones((batch, 1), dtype=mx.uint32), cache=cache)
        for c in cache:
            c.finalize()  # drops the all-zero padding of the merged empty states
        mx.eval(cache_state(cache))
        return lambda tokens: model(tokens, cache=cache)

    return make


def measure(
    make: Callable[[], Callable[[mx.array], mx.array]], x: mx.array, metal: bool, args: ModelArgs
) -> Stats:
    """Stats of ``make()(x)``; ``make`` is called before any patching, once per trace. The
    tokens of x pick distinct experts (at most all of them): the most a batch can read."""
    for_dot, for_trace = make(), make()
    with patched(metal, fuse_compiled=False):
        expected_compiled = compiled_nodes_in_dot(for_dot, x)
    with patched(metal, fuse_compiled=True):
        tokens = math.prod(x.shape[:2])  # (B, T) token ids or (B, T, D) activations
        experts_read = min(args.num_experts, tokens * args.num_experts_per_tok)
        stats = count(trace(for_trace, x), args.num_experts, experts_read)
    compiled = sum(v for k, v in stats.kinds.items() if k.startswith("compiled"))
    if compiled != expected_compiled:
        raise RuntimeError(f"fused {compiled} compiled functions, the lazy graph has {expected_compiled}")
    return stats


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.2f} MiB"


def report(title: str, rows: Dict[str, Stats], weights_label: str) -> None:
    base = next(iter(rows.values()))
    out = [
        [name, s.ops, f"{s.ops / base.ops:.2f}", s.dispatches, f"{s.dispatches / base.dispatches:.2f}",
         kib(s.weight_bytes), kib(s.act_read), kib(s.act_written)]
        for name, s in rows.items()
    ]
    print(f"\n{title}")
    headers = ["path", "ops", "ops / mlx-lm", "dispatches", "dispatches / mlx-lm", weights_label,
               "activations read", "activations written"]
    print(table(headers, out))
    print()
    for name, s in rows.items():
        print(f"- {name}: " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in s.kinds.items()))


def main() -> None:
    print(machine_report())
    dtype = mx.bfloat16
    config = hf_config("a3b-4l")
    args = ModelArgs.from_config(config)
    plan = default_plan(config)

    ours, theirs = blocks(args, plan, dtype)
    x = mx.zeros((1, 1, args.hidden_size), dtype)
    rows = {
        "mlx-lm Qwen3NextSparseMoeBlock, Metal": measure(lambda: theirs, x, metal=True, args=args),
        "ours, ops path (off Metal)": measure(lambda: ours, x, metal=False, args=args),
        "ours, Metal, model wiring today (shared expert in ops)": measure(lambda: ours, x, metal=True, args=args),
        "ours, Metal, shared expert fused": measure(lambda: partial(fused_shared, ours), x, metal=True, args=args),
    }
    report("MoE layer, one decode token (A3B shapes, 4-bit g64 experts, 8-bit routers, bf16)", rows, "weights read")
    del ours, theirs

    ours, theirs = models(config, plan, dtype)
    tokens = mx.array([[1]])
    rows = {"mlx-lm qwen3_5_moe, Metal": measure(decode_step(theirs), tokens, metal=True, args=args)}
    rows["ours, Metal, model wiring today"] = measure(decode_step(ours), tokens, metal=True, args=args)
    with shared_fused_wiring():
        rows["ours, Metal, shared expert fused"] = measure(decode_step(ours), tokens, metal=True, args=args)
    report(
        f"Whole decode step, {args.num_hidden_layers} layers (A3B shapes, vocabulary {args.vocab_size}), "
        "one token after a one-token prompt",
        rows,
        "weights + cache read",
    )
    batched_report(ours, theirs, args)


def batched_report(ours: nn.Module, theirs: nn.Module, args: ModelArgs, batch: int = 8) -> None:
    """One decode step for 1 and for ``batch`` sequences, and what each generated token costs."""
    rows = []
    for name, model in (("mlx-lm qwen3_5_moe", theirs), ("ours, model wiring today", ours)):
        for b in (1, batch):
            tokens = mx.ones((b, 1), dtype=mx.uint32)
            s = measure(batched_decode_step(model, b), tokens, metal=True, args=args)
            rows.append((name, b, s))
    base = {name: s for name, b, s in rows if b == 1}
    out = [
        [name, b, s.dispatches, f"{s.dispatches / b:.1f}", kib(s.weight_bytes), kib(s.weight_bytes // b),
         f"{base[name].weight_bytes / (s.weight_bytes / b):.2f}x", kib(s.act_read // b)]
        for name, b, s in rows
    ]
    print(f"\nBatched decode step, Metal, {args.num_hidden_layers} layers (A3B shapes), in mlx-lm's batch caches "
          "after a one-token prompt per sequence; each token's top-8 experts distinct from the others'")
    headers = ["path", "batch", "dispatches", "dispatches / token", "weights + cache read",
               "per generated token", "less than batch 1", "activations read / token"]
    print(table(headers, out))


if __name__ == "__main__":
    main()
