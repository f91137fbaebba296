"""The model against the transformers reference, on tiny random checkpoints of the real architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import BASE, perturb, make_checkpoint, reference_logits

import mlx.core as mx
from mlx_qwenmoe.loading import load_model

PROMPT_LEN = 48
CONTINUATION = 16

CASES = {
    "text-per-expert": dict(),
    "multimodal-fused": dict(multimodal=True, layout="fused"),
    "hv-eq-hk-top4-odd-vocab": dict(linear_num_value_heads=2, num_experts_per_tok=4, vocab_size=97),
    "sharded-fused-hv4x": dict(layout="fused", shards=3, linear_num_value_heads=8, num_hidden_layers=5),
    "interval-2-tied": dict(full_attention_interval=2, layer_types=None, tie_word_embeddings=True, seed=3),
}


def _greedy_reference(tm: torch.nn.Module, ids: np.ndarray, n: int) -> list:
    """Argmax decoding with transformers' own cache (its full-sequence forward agrees to 1e-7,
    and is 16x slower)."""
    out = []
    with torch.no_grad():
        step = tm(torch.tensor(ids), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = tm(torch.tensor([[out[-1]]]), cache=step.past_key_values, use_cache=True)
    return out


def _greedy_ours(model, ids: np.ndarray, n: int) -> list:
    cache = model.make_cache()
    logits = model(mx.array(ids), cache=cache)
    out = []
    for _ in range(n):
        nxt = int(mx.argmax(logits[0, -1]).item())
        out.append(nxt)
        logits = model(mx.array([[nxt]]), cache=cache)
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kwargs = dict(CASES[request.param])
    path, tm = make_checkpoint(tmp_path_factory.mktemp(request.param), **kwargs)
    model, _ = load_model(path)
    vocab = kwargs.get("vocab_size", BASE["vocab_size"])
    ids = np.random.RandomState(1).randint(0, vocab, (1, PROMPT_LEN))
    return tm, model, ids


def test_logits_match_transformers(pair):
    tm, model, ids = pair
    ref = reference_logits(tm, ids)
    ours = np.array(model(mx.array(ids)))
    assert np.abs(ours - ref).max() <= 1e-3


def test_greedy_continuation_matches_transformers(pair):
    tm, model, ids = pair
    assert _greedy_ours(model, ids, CONTINUATION) == _greedy_reference(tm, ids, CONTINUATION)


def test_cached_decode_equals_full_forward(pair):
    _, model, ids = pair
    full = np.array(model(mx.array(ids)))
    cache = model.make_cache()
    pieces = [np.array(model(mx.array(ids[:, :17]), cache=cache))]
    pieces.append(np.array(model(mx.array(ids[:, 17:30]), cache=cache)))
    for t in range(30, PROMPT_LEN):
        pieces.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    assert np.abs(np.concatenate(pieces, axis=1) - full).max() <= 1e-4


def test_batch_of_two_equals_each_alone(pair):
    _, model, ids = pair
    other = np.roll(ids, 5, axis=1)
    both = np.array(model(mx.array(np.concatenate([ids, other]))))
    assert np.abs(both[0] - np.array(model(mx.array(ids)))[0]).max() <= 1e-4
    assert np.abs(both[1] - np.array(model(mx.array(other)))[0]).max() <= 1e-4


def test_snapshot_restore_rolls_back_every_layer(pair):
    _, model, ids = pair
    cache = model.make_cache()
    model(mx.array(ids[:, :20]), cache=cache)
    snaps = [c.snapshot() for c in cache]
    expected = np.array(model(mx.array(ids[:, 20:24]), cache=cache))
    model(mx.array(ids[:, 30:33]), cache=cache)  # a rejected continuation
    for c, s in zip(cache, snaps):
        c.restore(s)
    assert np.abs(np.array(model(mx.array(ids[:, 20:24]), cache=cache)) - expected).max() <= 1e-5


def test_qwen3_next_fused_projections(tmp_path):
    """Qwen3-Next stores [q k v z] and [b a] fused per key head, and may have dense MLP layers."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    tm = Qwen3NextForCausalLM(Qwen3NextConfig(**{**BASE, "intermediate_size": 48, "mlp_only_layers": [1]}))
    perturb(tm, 0)
    tm.eval().save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    ids = np.random.RandomState(2).randint(0, BASE["vocab_size"], (1, PROMPT_LEN))
    assert np.abs(np.array(model(mx.array(ids))) - reference_logits(tm, ids)).max() <= 1e-3


def test_bfloat16_weights_load_and_stay_close(tmp_path):
    path, tm = make_checkpoint(tmp_path)
    model, _ = load_model(path, dtype=mx.bfloat16)
    assert model.layers[0].linear_attn.A_log.dtype == mx.float32
    assert model.layers[0].linear_attn.in_proj_qkv.weight.dtype == mx.bfloat16
    if mx.default_device() == mx.cpu:
        assert model.layers[0].mlp.switch_mlp.gate_proj.weight.dtype == mx.float32
    ids = np.random.RandomState(3).randint(0, BASE["vocab_size"], (1, 24))
    ours = np.array(model(mx.array(ids)).astype(mx.float32))
    ref = reference_logits(tm, ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_mlx_lm_quantized_checkpoint_loads_as_is(tmp_path):
    """A directory written by ``mlx_lm.convert -q`` (what mlx-community ships) loads unchanged,
    and computes what mlx-lm computes from it."""
    from mlx_lm import convert as mlx_lm_convert
    from mlx_lm.utils import load_model as mlx_lm_load_model

    hf, _ = make_checkpoint(tmp_path / "hf", multimodal=True, layout="fused")
    mlx_dir = tmp_path / "mlx"
    mlx_lm_convert(str(hf), str(mlx_dir), quantize=True, q_group_size=32, q_bits=4)
    ours, config = load_model(mlx_dir)
    theirs, _ = mlx_lm_load_model(mlx_dir)
    assert config["quantization"]["bits"] == 4
    assert "scales" in ours.layers[0].mlp.switch_mlp.gate_proj
    ids = mx.array(np.random.RandomState(4).randint(0, BASE["vocab_size"], (1, 32)))
    assert mx.abs(ours(ids) - theirs(ids)).max().item() <= 1e-4


def test_quantized_experts_keep_their_stored_scales(tmp_path):
    """Only unquantized experts are widened to float32 on the CPU (for gather_mm); a bf16
    quantized checkpoint keeps bf16 scales and biases, so memory is what the files say."""
    from mlx_lm import convert as mlx_lm_convert

    hf, _ = make_checkpoint(tmp_path / "hf", multimodal=True, layout="fused")
    mlx_dir = tmp_path / "mlx"
    mlx_lm_convert(str(hf), str(mlx_dir), quantize=True, q_group_size=32, q_bits=4, dtype="bfloat16")
    model, _ = load_model(mlx_dir)
    experts = model.layers[0].mlp.switch_mlp.gate_proj
    assert experts.weight.dtype == mx.uint32
    assert experts.scales.dtype == experts.biases.dtype == mx.bfloat16
