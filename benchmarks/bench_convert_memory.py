"""Peak memory of ``mlx_qwenmoe convert`` against checkpoint size (not a test: run it by hand).

Writes a synthetic BF16 checkpoint with Qwen3.5-35B-A3B's real tensor shapes (fused expert
layout, as the official checkpoints ship; ``--layers`` decoder layers, 3 DeltaNet : 1
attention) shard by shard into a temporary directory, converts it in a child process and
reports that process's peak RSS (``ru_maxrss``) next to the checkpoint size, plus the RSS of
a child that only imports and plans, to separate the fixed overhead. Everything written is
removed at the end.

    nice python benchmarks/bench_convert_memory.py --layers 4 [--bits 4 | --fit 24GB]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import mlx.core as mx

from mlx_qwenmoe.config import ModelArgs
from mlx_qwenmoe.convert.writer import ShardWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "qwen3_5_35b_a3b_config.json"
GiB = 1 << 30
BLOCK = 32 << 20  # random bf16 values generated once and reused for every chunk


def a3b_config(layers: int) -> dict:
    config = json.loads(FIXTURE.read_text())
    text = config["text_config"]
    text.update(num_hidden_layers=layers, mtp_num_hidden_layers=0,
                layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)])
    return config


def hf_tensors(args: ModelArgs) -> Iterator[Tuple[str, Tuple[int, ...]]]:
    """Names and shapes of the official checkpoint's text tensors (see the facts sheet)."""
    h, e, i, si = args.hidden_size, args.num_experts, args.moe_intermediate_size, args.shared_expert_intermediate_size
    hv, dv, dk = args.linear_num_value_heads, args.linear_value_head_dim, args.linear_key_head_dim
    conv = 2 * args.linear_num_key_heads * dk + hv * dv
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    yield "model.language_model.embed_tokens.weight", (args.vocab_size, h)
    for n in range(args.num_hidden_layers):
        p = f"model.language_model.layers.{n}."
        if args.is_linear(n):
            yield from ((p + "linear_attn." + k, s) for k, s in (
                ("in_proj_qkv.weight", (conv, h)), ("in_proj_z.weight", (hv * dv, h)), ("in_proj_a.weight", (hv, h)),
                ("in_proj_b.weight", (hv, h)), ("conv1d.weight", (conv, 1, args.linear_conv_kernel_dim)),
                ("A_log", (hv,)), ("dt_bias", (hv,)), ("norm.weight", (dv,)), ("out_proj.weight", (h, hv * dv))))
        else:
            yield from ((p + "self_attn." + k, s) for k, s in (
                ("q_proj.weight", (2 * q, h)), ("k_proj.weight", (kv, h)), ("v_proj.weight", (kv, h)),
                ("o_proj.weight", (h, q)), ("q_norm.weight", (args.head_dim,)), ("k_norm.weight", (args.head_dim,))))
        yield from ((p + k, s) for k, s in (
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)), ("mlp.gate.weight", (e, h)),
            ("mlp.experts.gate_up_proj", (e, 2 * i, h)), ("mlp.experts.down_proj", (e, h, i)),
            ("mlp.shared_expert.gate_proj.weight", (si, h)), ("mlp.shared_expert.up_proj.weight", (si, h)),
            ("mlp.shared_expert.down_proj.weight", (h, si)), ("mlp.shared_expert_gate.weight", (1, h))))
    yield "model.language_model.norm.weight", (h,)
    yield "lm_head.weight", (args.vocab_size, h)


def write_checkpoint(out: Path, layers: int) -> int:
    """The synthetic checkpoint, a row chunk at a time (this process never holds a whole tensor)."""
    config = a3b_config(layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors: List[Tuple[str, Tuple[int, ...], str]] = [(n, s, "bfloat16") for n, s in hf_tensors(ModelArgs.from_config(config))]
    block = (mx.random.normal((BLOCK,)) * 0.02).astype(mx.bfloat16)
    writer = ShardWriter(out, tensors, max_shard_bytes=4 * 10**9)
    for name, shape, _ in tensors:
        row = 1
        for d in shape[1:]:
            row *= d
        step = max(1, BLOCK // row)
        for start in range(0, shape[0], step):
            n = min(step, shape[0] - start)
            writer.write(name, block[: n * row].reshape(n, *shape[1:]), start)
    writer.close()
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def child_peak_rss(code: str) -> Tuple[int, float]:
    """Peak RSS (bytes) and wall time of ``python -c code``."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child failed with status {status}")
    return usage.ru_maxrss * 1024, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--fit", default=None)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    opts = parser.parse_args()
    # The BF16 source (~1.6 GiB per A3B layer) and its quantized copy, side by side.
    C.require_resources(memory=3 * GiB, disk=int(opts.layers * 2.2 * GiB), where=Path(opts.tmp))
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=opts.tmp))
    try:
        src, dst = work / "src", work / "dst"
        src.mkdir()
        size = write_checkpoint(src, opts.layers)
        recipe = f"fit={opts.fit!r}, context=32768" if opts.fit else f"bits={opts.bits}"
        base_rss, _ = child_peak_rss(
            "from mlx_qwenmoe.convert import convert; "
            f"convert({str(src)!r}, dry_run=True, {recipe})"
        )
        peak, wall = child_peak_rss(
            "from mlx_qwenmoe.convert import convert; "
            f"plan = convert({str(src)!r}, {str(dst)!r}, {recipe}); "
            f"import json; t = json.load(open({str(dst / 'model.safetensors.index.json')!r}))['metadata']['total_size']; "
            "assert t == plan.weight_bytes, (t, plan.weight_bytes)"
        )
        written = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
        print(f"| {opts.layers} layers (A3B shapes, BF16) | {recipe} | {size / GiB:.2f} GiB | {written / GiB:.2f} GiB "
              f"| {peak / GiB:.2f} GiB ({100 * peak / size:.1f}%) | {base_rss / GiB:.2f} GiB | {wall:.0f} s |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
