"""The MTP head against an independent reference built from transformers' own layers.

transformers has no MTP head for Qwen3.5, so the reference assembles the published design
from its parts: the zero-centred ``Qwen3_5MoeRMSNorm`` for ``pre_fc_norm_embedding`` /
``pre_fc_norm_hidden``, ``fc`` over [normed embedding, normed hidden], then a one-layer
``Qwen3_5MoeTextModel`` (full attention + MoE, its own causal mask and RoPE from position 0)
holding ``mtp.layers.0.*`` and ``mtp.norm``. Its inputs are transformers' main-model hidden
states and embeddings. Our head is loaded from the same Hugging Face-layout checkpoint, so
every name mapping and norm offset of ``checkpoint.hf_to_mlx`` for ``mtp.*`` is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm, Qwen3_5MoeTextModel

import mlx.core as mx
from mlx_qwenmoe.loading import load_model
from tiny_models import add_mtp, make_checkpoint, text_config

IDS = np.array([3, 17, 42, 5, 9, 88, 1, 60, 23, 7, 14, 99], dtype=np.int64)


def _mtp_tensors(model_dir, num_experts: int) -> dict:
    """The checkpoint's mtp.* tensors without the prefix, experts fused as transformers holds them."""
    tensors = {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    mtp = {k[len("mtp."):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("mtp.")}
    per_expert = "layers.0.mlp.experts.{}.{}.weight"
    if per_expert.format(0, "gate_proj") in mtp:
        take = lambda proj: [mtp.pop(per_expert.format(e, proj)) for e in range(num_experts)]  # noqa: E731
        gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
        mtp["layers.0.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(p) for p in zip(gate, up)])
        mtp["layers.0.mlp.experts.down_proj"] = torch.stack(down)
    return mtp


def reference_mtp(model_dir, hf_model: torch.nn.Module, hidden: torch.Tensor, next_ids: torch.Tensor) -> np.ndarray:
    """The MTP head's normed output for (main-model hidden at t, token t+1), positions 0..T-1."""
    config = text_config(num_hidden_layers=1, layer_types=["full_attention"])
    mtp = _mtp_tensors(model_dir, config.num_experts)
    block = Qwen3_5MoeTextModel(config).eval()
    block_state = {k: v for k, v in mtp.items() if k.startswith(("layers.", "norm."))}
    block_state["embed_tokens.weight"] = block.embed_tokens.weight.detach()
    block.load_state_dict(block_state, strict=True)
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        norms[name] = Qwen3_5MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norms[name].load_state_dict({"weight": mtp[f"{name}.weight"]})
    with torch.no_grad():
        embeddings = hf_model.get_input_embeddings()(next_ids)
        fused = torch.cat([norms["pre_fc_norm_embedding"](embeddings), norms["pre_fc_norm_hidden"](hidden)], dim=-1)
        x = fused @ mtp["fc.weight"].T
        return block(inputs_embeds=x).last_hidden_state.float().numpy()


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_mtp_head_matches_independent_reference(tmp_path, layout):
    model_dir, hf_model = make_checkpoint(tmp_path, seed=11, layout=layout)
    add_mtp(model_dir, seed=12)
    ours, _ = load_model(model_dir)

    ids = torch.from_numpy(IDS[None, :-1])
    with torch.no_grad():
        hidden = hf_model.model(ids).last_hidden_state
    expected = reference_mtp(model_dir, hf_model, hidden, torch.from_numpy(IDS[None, 1:]))

    our_hidden = ours.hidden(mx.array(IDS[None, :-1]))
    got = ours.mtp(our_hidden, ours.embed(mx.array(IDS[1:]))[None], ours.make_mtp_cache())
    # Same float32 maths in another framework: ~1e-6. A wrong norm offset or mapping moves it by O(0.1-1).
    np.testing.assert_allclose(np.array(got), expected, atol=1e-4, rtol=1e-4)
