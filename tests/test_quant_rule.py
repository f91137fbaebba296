"""One quantization rule: ``mlx_lm.convert`` of our model (through ``Model.quant_predicate``), our
converter's plan and the benchmarks' random checkpoints quantize every tensor alike."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

from mlx_qwenmoe.checkpoint import EIGHT_BIT_MODULES
from mlx_qwenmoe.config import ModelArgs
from mlx_qwenmoe.convert import plan_conversion
from mlx_qwenmoe.loading import load_model
from mlx_qwenmoe.model import Model

# Every input dimension divides 64, so no group-size fallback blurs the comparison.
CONFIG = {
    "model_type": "qwen3_5_moe_text", "vocab_size": 256, "hidden_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "full_attention_interval": 4, "mtp_num_hidden_layers": 1,
}


def quantized_modules(model) -> dict:
    return {path: (m.bits, m.group_size) for path, m in model.named_modules() if hasattr(m, "bits") and path}


def planned() -> dict:
    plan = plan_conversion(CONFIG, bits=4, group_size=64)
    return {t.module: (t.bits, t.group_size) for t in plan.tensors if t.bits}


def test_mlx_lm_convert_of_our_model_quantizes_as_our_converter():
    args = ModelArgs.from_config(CONFIG)
    model = Model(args, with_mtp=True)
    quantize_model(model, {}, group_size=64, bits=4, quant_predicate=model.quant_predicate)
    ours = quantized_modules(model)
    assert ours == planned()
    eight = sorted(p for p, (bits, _) in ours.items() if bits == 8)
    assert eight and all(p.endswith(EIGHT_BIT_MODULES) for p in eight)
    assert any(p.endswith("linear_attn.in_proj_a") for p in eight) and any(p.endswith("mlp.gate") for p in eight)


def test_benchmark_checkpoints_are_what_the_converter_writes(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    out = common.ensure_checkpoint(tmp_path / "ckpt", CONFIG, common.default_plan(CONFIG), log=lambda _m: None)
    model, config = load_model(out)
    assert quantized_modules(model) == planned()
    assert config["quantization"] == plan_conversion(CONFIG, bits=4, group_size=64).quantization_config()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {k for k, _ in tree_flatten(model.parameters())}
