"""The converter end to end on tiny transformers checkpoints: what it writes loads in our model and
in mlx-lm's, stays close to the float model, and is exactly the plan's bytes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.utils import load_model as mlx_lm_load_model
from safetensors.numpy import load_file, save_file

from mlx_qwenmoe.checkpoint import rename
from mlx_qwenmoe.convert import convert, plan_conversion
from mlx_qwenmoe.loading import load_model
from tiny_models import make_checkpoint, reference_logits

# hidden 128 / expert intermediate 64 take group 64; the shared expert's down_proj (input 32)
# exercises the fallback to group 32.
SHAPES = dict(hidden_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=32, vocab_size=256)
IDS = np.random.default_rng(0).integers(0, 256, size=(1, 48))
# Bounds on (max |diff|, mean |diff|) of the logits against the float model and on top-1 agreement.
# Measured (run with -s): 8-bit max 0.08-0.11 (a routing flip), mean 0.003, top-1 >= 0.98; 4-bit max
# ~0.2, mean ~0.034, top-1 0.62-0.75. Random tiny models have logits of std ~0.22 and top-1/top-2
# gaps of ~0.07, so 4-bit noise flips many near-ties; the bounds leave ~2x margin on the diffs.
TOLERANCE = {"8bit": (0.25, 0.008, 0.95), "4bit": (0.45, 0.07, 0.5), "fit": (0.45, 0.07, 0.5)}


def _add_mtp(model_dir: Path) -> None:
    """Give the checkpoint an MTP head the way Qwen3.5's ships it (transformers does not save one):
    a copy of the last (full-attention) layer as mtp.layers.0, plus mtp.fc and its norms."""
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = "model.layers.3."
    mtp = {}
    for fname in sorted(set(index["weight_map"].values())):
        for k, v in load_file(model_dir / fname).items():
            if k.startswith(last):
                mtp["mtp.layers.0." + k[len(last):]] = v
    h = SHAPES["hidden_size"]
    rng = np.random.default_rng(1)
    mtp["mtp.fc.weight"] = (rng.standard_normal((h, 2 * h)) * 0.05).astype(np.float32)
    for n in ("mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"):
        mtp[n] = (rng.standard_normal(h) * 0.1).astype(np.float32)
    save_file(mtp, str(model_dir / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    per_expert, torch_a = make_checkpoint(root / "per_expert", layout="per_expert", shards=3, **SHAPES)
    _add_mtp(per_expert)
    (per_expert / "chat_template.jinja").write_text("{{ messages }}")
    (per_expert / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    fused, torch_b = make_checkpoint(root / "fused", layout="fused", multimodal=True, shards=2, seed=1, **SHAPES)
    return {"per_expert": (per_expert, torch_a), "fused": (fused, torch_b)}


def _fake_quantized(torch_model, plan):
    """transformers' model with each weight the plan quantizes replaced by quantize-then-dequantize of
    it, in transformers' own layout. Affine groups run along the input dimension, which every
    name/layout mapping of the converter leaves alone, so this reference needs none of them (norm
    offsets, expert stacking): it is what the converted checkpoint must compute, to float error."""
    model = copy.deepcopy(torch_model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            target = re.sub(r"\.experts\.(gate_up|down)_proj$", lambda m: f".switch_mlp.{'gate' if m.group(1) == 'gate_up' else 'down'}_proj.weight", rename(name))
            t = plan[target] if target in plan else None
            if t is None or t.bits is None:
                continue
            w = mx.array(p.detach().numpy())
            w = mx.dequantize(*mx.quantize(w, group_size=t.group_size, bits=t.bits), group_size=t.group_size, bits=t.bits)
            p.copy_(torch.from_numpy(np.array(w)))
    return model


def _fit_ram(src: Path) -> int:
    """RAM whose working set lands between the 6- and 4-bit tiers, so the fit mixes bit widths."""
    config = json.loads((src / "config.json").read_text())
    low, high = (plan_conversion(config, bits=b, context=0, reserve=0).weight_bytes for b in (4, 6))
    cache = plan_conversion(config, context=0, reserve=0).cache_bytes
    return int(((low + high) // 2 + cache) * 3 // 2)


def _written_data_bytes(out: Path) -> int:
    return sum(v.nbytes for f in out.glob("model*.safetensors") for v in mx.load(str(f)).values())


def _logit_stats(logits: np.ndarray, ref: np.ndarray):
    diff = np.abs(logits - ref)
    return float(diff.max()), float(diff.mean()), float((logits.argmax(-1) == ref.argmax(-1)).mean())


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("recipe", ["4bit", "8bit", "fit"])
def test_converted_checkpoint_loads_and_matches(sources, tmp_path, layout, recipe):
    src, torch_model = sources[layout]
    reference = reference_logits(torch_model, IDS)
    options = {"4bit": dict(bits=4), "8bit": dict(bits=8), "fit": dict(fit=_fit_ram(src), context=0, reserve=0)}[recipe]
    out = tmp_path / "out"
    plan = convert(src, out, max_shard_bytes=200_000, **options)

    assert plan.weight_bytes == _written_data_bytes(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == plan.weight_bytes
    shards = [list(mx.load(str(out / f)).values()) for f in set(index["weight_map"].values())]
    assert len(shards) > 1 and all(sum(v.nbytes for v in s) <= 200_000 or len(s) == 1 for s in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["quantization_config"] == config["quantization"]
    assert "vision_config" not in config
    if recipe == "fit":
        expert_bits = {t.bits for t in plan.tensors if t.kind == "experts"}
        assert len(expert_bits) == 2 and plan.headroom_bytes >= 0, plan.summary()
    assert recipe == "8bit" or all(
        config["quantization"][f"language_model.model.layers.{i}.mlp.gate"] == {"group_size": 64, "bits": 8} for i in range(4))

    model, _ = load_model(out)
    logits = np.array(model(mx.array(IDS)).astype(mx.float32))
    max_diff, mean_diff, top1 = _logit_stats(logits, reference)
    print(f"\n{layout} {recipe}: logits max|diff| {max_diff:.4f} mean|diff| {mean_diff:.4f} top-1 {top1:.3f} "
          f"({8 * plan.weight_bytes / plan.params:.2f} bits/weight)")
    max_tol, mean_tol, top1_min = TOLERANCE[recipe]
    assert max_diff < max_tol and mean_diff < mean_tol and top1 >= top1_min
    # The tight check: the same quantization applied in transformers' layout. Float error is ~1e-5;
    # a wrong norm offset or mapping is >= 0.05 (a q_norm offset bug measured 0.41 above).
    fake = reference_logits(_fake_quantized(torch_model, plan), IDS)
    assert np.abs(logits - fake).max() < 2e-3

    if layout == "per_expert":
        assert model.has_mtp and any(k.startswith("mtp.") for k in index["weight_map"])
        assert "mtp.layers.0.mlp.switch_mlp.up_proj.scales" in index["weight_map"]
        assert (out / "chat_template.jinja").exists() and (out / "tokenizer_config.json").exists()
    assert (out / "generation_config.json").exists()

    theirs, _ = mlx_lm_load_model(out)  # mlx-lm reads what we write (it drops the MTP head)
    their_logits = np.array(theirs(mx.array(IDS[:, :16])).astype(mx.float32))
    assert np.abs(their_logits - logits[:, :16]).max() < 1e-3


def test_plan_fallback_rule():
    """Inputs the group does not divide take the largest smaller group that does, else stay float."""
    config = {"model_type": "qwen3_5_moe_text", **{k: v for k, v in json.loads(
        (Path(__file__).parent / "fixtures" / "qwen3_5_35b_a3b_config.json").read_text())["text_config"].items()}}
    config.update(hidden_size=48, num_hidden_layers=4, layer_types=None, full_attention_interval=4, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=96, shared_expert_intermediate_size=64, vocab_size=64, mtp_num_hidden_layers=0,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, linear_num_key_heads=1,
                  linear_num_value_heads=2, linear_key_head_dim=32, linear_value_head_dim=32)
    plan = plan_conversion(config, bits=4, group_size=64)
    by_module = {t.module.split(".", 2)[-1]: t for t in plan.tensors}
    assert by_module["embed_tokens"].bits is None  # input 48: neither 64 nor 32 divides it
    assert by_module["layers.0.mlp.switch_mlp.down_proj"].group_size == 32  # input 96
    assert by_module["layers.0.mlp.shared_expert.down_proj"].group_size == 64  # input 64
    assert plan.quantization_config()["language_model.model.layers.0.mlp.switch_mlp.down_proj"] == {"group_size": 32, "bits": 4}


def test_qwen3_next_converts_to_qwen3_5_moe(tmp_path):
    """Qwen3-Next's fused [q k v z]/[b a] rows are regrouped across heads (mapped whole, not in row
    chunks), its dense MLP layer has input 48 (no group divides it: kept float), and the output
    says model_type qwen3_5_moe. (mlx-lm's qwen3_5_moe has no mlp_only_layers, so only our loader.)"""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from tiny_models import BASE, perturb

    torch.manual_seed(0)
    tm = Qwen3NextForCausalLM(Qwen3NextConfig(**{**BASE, "intermediate_size": 48, "mlp_only_layers": [1]}))
    perturb(tm, 0)
    tm.eval().save_pretrained(tmp_path / "src")
    plan = convert(tmp_path / "src", tmp_path / "out", bits=8)
    assert plan["language_model.model.layers.1.mlp.down_proj.weight"].bits is None
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and "rope_parameters" in config
    model, _ = load_model(tmp_path / "out")
    ids = IDS % BASE["vocab_size"]
    max_diff, mean_diff, top1 = _logit_stats(np.array(model(mx.array(ids)).astype(mx.float32)), reference_logits(tm, ids))
    max_tol, mean_tol, top1_min = TOLERANCE["8bit"]
    assert max_diff < max_tol and mean_diff < mean_tol and top1 >= top1_min


def test_memory_rules():
    from mlx_qwenmoe.convert.memory import GiB, parse_size, working_set_limit

    assert parse_size("24GB") == parse_size("24 GiB") == parse_size("24g") == 24 * GiB
    assert parse_size("512MB") == GiB // 2
    assert working_set_limit(16 * GiB) == 16 * GiB * 2 // 3  # 10.67 GiB, as macOS reports
    assert working_set_limit(24 * GiB) == 16 * GiB
    assert working_set_limit(64 * GiB) == 48 * GiB
