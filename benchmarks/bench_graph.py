"""Graph statistics of one decode step of the MoE block: operations and bytes moved, ours vs mlx-lm.

Counted from the lazy graph MLX would evaluate, not timed, so it holds for a Mac
while running anywhere. The graph is traced with ``mx.export_function`` (which
reports every primitive with its input and output shapes) on the real
Qwen3.5-35B-A3B layer shapes (hidden 2048, 256 experts top-8, expert and shared
intermediate 512), 4-bit group-64 experts and 8-bit routers (mlx-lm's recipe),
bfloat16 activations, one token.

Two things the trace cannot show are rebuilt in it, each as one fused node:
* a ``mx.fast.metal_kernel`` launch (the CPU build cannot create one): our
  kernels are swapped for a node that reads the kernel's inputs and writes its
  outputs, which is exactly one dispatch on a Mac;
* an ``mx.compile``'d function (mlx-lm's ``swiglu``, ``nn.silu``), which the
  trace inlines but Metal runs as one fused kernel. The count of such nodes is
  checked against the ``Compiled`` nodes of ``mx.export_to_dot``.

"ops" counts every primitive; "dispatches" leaves out views that move no data
on Metal (reshape, broadcast, slice, ...). Bytes: each dispatch reads its inputs
(a stacked expert tensor only for the top-k experts it selects) and writes its
outputs; "activations written" leaves out the final output.

    nice python benchmarks/bench_graph.py
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from common import hf_config, machine_report, table  # noqa: E402
from mlx.utils import tree_map  # noqa: E402
from mlx_lm.models import qwen3_next, switch_layers  # noqa: E402

from mlx_qwenmoe import kernels  # noqa: E402
from mlx_qwenmoe.config import ModelArgs  # noqa: E402
from mlx_qwenmoe.model import SparseMoeBlock  # noqa: E402
from mlx_qwenmoe.ops import moe  # noqa: E402

VIEWS = {"Reshape", "ExpandDims", "Squeeze", "Broadcast", "Slice", "StopGradient", "Depends", "Transpose", "AsStrided"}
WEIGHT_OPS = ("QuantizedMatmul", "GatherQMM", "GatherMM", "Matmul")


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
    n = 1
    for s in shape:
        n *= s
    return n * dtype.size


# --- fused nodes: metal_kernel launches and compiled functions --------------------------------

_FUSED: List[str] = []  # label of each fused node, indexed by its tag constant


def _fused_node(label: str, inputs: Sequence[mx.array], shapes: Sequence[Sequence[int]], dtypes: Sequence[Any]) -> List[mx.array]:
    """One node reading ``inputs`` and writing arrays of ``shapes``: ``Depends`` on placeholders plus a tag."""
    _FUSED.append(label)
    tag = mx.array(len(_FUSED) - 1, dtype=mx.int32)
    placeholders = [mx.zeros(tuple(s), d) for s, d in zip(shapes, dtypes)]
    return mx.depends(placeholders, [tag, *inputs])


def _fake_metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], **_kwargs: Any) -> Callable:
    def launch(*, inputs, output_shapes, output_dtypes, **_launch: Any) -> List[mx.array]:
        return _fused_node(f"kernel {name}", inputs, output_shapes, output_dtypes)

    return launch


def _fused_function(label: str, fn: Callable) -> Callable:
    def call(*args: mx.array) -> mx.array:
        shape_probe = fn(*args)  # built lazily and never evaluated: only its shape and dtype are used
        return _fused_node(label, args, [shape_probe.shape], [shape_probe.dtype])[0]

    return call


# mx.compile'd functions these blocks call, by the module attribute they are looked up through.
COMPILED = [(switch_layers, "swiglu"), (qwen3_next, "swiglu"), (nn, "silu")]


@contextlib.contextmanager
def patched(metal: bool, fuse_compiled: bool) -> Iterator[None]:
    saved: List[Tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if metal:
        patch(mx.fast, "metal_kernel", _fake_metal_kernel)
        patch(kernels, "use_metal", lambda: True)
    if fuse_compiled:
        for module, attr in COMPILED:
            patch(module, attr, _fused_function(f"compiled {attr}", getattr(module, attr)))
    kernels.build.cache_clear()
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
        kernels.build.cache_clear()


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


def count(graph: Graph, num_experts: int, top_k: int) -> Stats:
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
        weighty = label in WEIGHT_OPS or label.startswith("kernel")
        for name, shape, dtype in inputs:
            b = _nbytes(shape, dtype)
            if weighty and name in constants:
                if len(shape) == 3 and shape[0] == num_experts:
                    b = b * top_k // num_experts  # a decode token reads only its top-k experts
                stats.weight_bytes += b
            else:
                stats.act_read += b
        stats.act_written += sum(_nbytes(s, d) for nm, s, d in n.outputs if nm not in graph.outputs)
    return stats


# --- the blocks -------------------------------------------------------------------------------


def _concrete(module: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """Quantize with mlx-lm's recipe, then give every parameter concrete zeros (the graph ignores values)."""
    nn.quantize(
        module,
        class_predicate=lambda p, m: hasattr(m, "to_quantized")
        and ({"bits": 8, "group_size": 64} if p == "gate" or p.endswith("shared_expert_gate") else {"bits": 4, "group_size": 64}),
    )
    module.update(tree_map(lambda p: mx.zeros(p.shape, p.dtype if p.dtype == mx.uint32 else dtype), module.parameters()))
    mx.eval(module.parameters())
    return module


def blocks(dtype: mx.Dtype) -> Tuple[ModelArgs, nn.Module, nn.Module]:
    args = ModelArgs.from_config(hf_config("a3b-4l"))
    ours = _concrete(SparseMoeBlock(args), dtype)
    # The block reads only these fields of mlx-lm's ModelArgs.
    theirs_args = SimpleNamespace(
        hidden_size=args.hidden_size, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size, norm_topk_prob=args.norm_topk_prob,
        shared_expert_intermediate_size=args.shared_expert_intermediate_size,
    )
    theirs = _concrete(qwen3_next.Qwen3NextSparseMoeBlock(theirs_args), dtype)
    return args, ours, theirs


def fused_shared(block: SparseMoeBlock) -> Callable[[mx.array], mx.array]:
    """Our block with the shared expert handed to ``routed_experts`` (the proposed model wiring)."""

    def run(x: mx.array) -> mx.array:
        weights, inds = moe.route(block.gate(x), block.top_k, block.norm_topk_prob)
        return moe.routed_experts(x, inds, weights, block.switch_mlp, block.shared_expert, block.shared_expert_gate)

    return run


def measure(fn: Callable[[mx.array], mx.array], x: mx.array, metal: bool, args: ModelArgs) -> Stats:
    with patched(metal, fuse_compiled=False):
        expected_compiled = compiled_nodes_in_dot(fn, x)
    with patched(metal, fuse_compiled=True):
        stats = count(trace(fn, x), args.num_experts, args.num_experts_per_tok)
    compiled = sum(v for k, v in stats.kinds.items() if k.startswith("compiled"))
    if compiled != expected_compiled:
        raise RuntimeError(f"fused {compiled} compiled functions, the lazy graph has {expected_compiled}")
    return stats


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.2f} MiB"


def main() -> None:
    print(machine_report())
    dtype = mx.bfloat16
    args, ours, theirs = blocks(dtype)
    x = mx.zeros((1, 1, args.hidden_size), dtype)
    rows = {
        "mlx-lm Qwen3NextSparseMoeBlock (Metal)": measure(theirs, x, metal=True, args=args),
        "ours, ops path (off Metal)": measure(ours, x, metal=False, args=args),
        "ours, Metal, model wiring today (shared expert in ops)": measure(ours, x, metal=True, args=args),
        "ours, Metal, shared expert fused": measure(fused_shared(ours), x, metal=True, args=args),
    }
    base = next(iter(rows.values()))
    out = []
    for name, s in rows.items():
        out.append([
            name, s.ops, s.dispatches, f"{s.dispatches / base.dispatches:.2f}", kib(s.weight_bytes),
            kib(s.act_read), kib(s.act_written),
        ])
    print()
    print("MoE layer, one decode token (A3B shapes, 4-bit g64 experts, 8-bit routers, bf16)")
    print(table(["path", "ops", "dispatches", "dispatches / mlx-lm", "weights read", "activations read", "activations written"], out))
    print()
    for name, s in rows.items():
        print(f"{name}: " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in s.kinds.items()))


if __name__ == "__main__":
    main()
