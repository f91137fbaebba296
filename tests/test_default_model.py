"""Pins the demo checkpoint shipped in the package (see mlx_qwenmoe/default_model/MODEL_CARD.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_qwenmoe.api import default_model_dir, load
from mlx_qwenmoe.checkpoint import OFFSET_NORM_SUFFIXES

# Held-out perplexity of the shipped 4-bit model on heldout_sample.txt, scored in
# non-overlapping 256-token windows (tools/eval_demo_model.py --mlx), as the card records.
RECORDED_PPL = 24.97
WINDOW = 256

pytestmark = pytest.mark.skipif(
    not (default_model_dir() / "config.json").is_file(), reason="demo model not shipped in this checkout"
)


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load()
    return model, tokenizer


def _sample_ids(tokenizer) -> np.ndarray:
    text = (default_model_dir() / "heldout_sample.txt").read_text()
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = (len(ids) - 1) // WINDOW
    return np.stack([ids[i * WINDOW : i * WINDOW + WINDOW + 1] for i in range(n)])


def test_heldout_perplexity_matches_the_card(shipped):
    model, tokenizer = shipped
    windows = _sample_ids(tokenizer)
    logits = model(mx.array(windows[:, :-1]))
    nll = nn.losses.cross_entropy(logits, mx.array(windows[:, 1:]), reduction="mean").item()
    assert abs(math.exp(nll) - RECORDED_PPL) <= 0.05 * RECORDED_PPL


def _as_transformers_state_dict(model) -> dict:
    """Our (quantized) weights, dequantized and mapped back to transformers' parameter names."""
    modules = dict(model.named_modules())
    state = {}
    for name, value in tree_flatten(model.parameters()):
        owner, leaf = name.rsplit(".", 1)
        if name.startswith("mtp.") or leaf in ("scales", "biases"):
            continue
        module = modules[owner]
        if leaf == "weight" and "scales" in module:
            value = mx.dequantize(value, module.scales, module.biases, module.group_size, module.bits)
        hf = name.replace("language_model.model.", "model.").replace("language_model.lm_head", "lm_head")
        if name.endswith(OFFSET_NORM_SUFFIXES) or hf == "model.norm.weight":
            value = value - 1.0
        if hf.endswith("conv1d.weight"):
            value = value.swapaxes(1, 2)
        state[hf] = value
    for key in [k for k in state if ".switch_mlp.gate_proj." in k]:
        prefix = key.split(".switch_mlp.")[0]
        gate, up = state.pop(key), state.pop(f"{prefix}.switch_mlp.up_proj.weight")
        state[f"{prefix}.experts.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
        state[f"{prefix}.experts.down_proj"] = state.pop(f"{prefix}.switch_mlp.down_proj.weight")
    return {k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in state.items()}


def test_logits_match_transformers_on_the_dequantized_weights(shipped):
    model, tokenizer = shipped
    cfg = {k: v for k, v in model.args.__dict__.items() if k not in ("model_type", "eos_token_id")}
    cfg["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": cfg.pop("rope_theta"),
        "partial_rotary_factor": cfg.pop("partial_rotary_factor"),
    }
    reference = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**cfg)).eval()
    reference.load_state_dict(_as_transformers_state_dict(model), strict=True)
    ids = _sample_ids(tokenizer)[:1, :64]
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() <= 1e-3
