"""Tiny random checkpoints of the real architecture, written by transformers itself.

Tests load them with our code and compare against the transformers model (the oracle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import (
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
)

from mlx_qwenmoe.api import default_model_dir

BASE: Dict[str, Any] = dict(
    vocab_size=101,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)


def text_config(**overrides: Any) -> Qwen3_5MoeTextConfig:
    return Qwen3_5MoeTextConfig(**{**BASE, **overrides})


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norms at 0 (offset form) and the router near uniform; shake them so
    that norm offsets, routing and top-k ties are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def fuse_experts(model_dir: Path, num_experts: int) -> None:
    """Rewrite a per-expert checkpoint (what transformers 5 saves) in the fused layout of the
    official Qwen3.5 checkpoints: experts.gate_up_proj (E, 2I, D) and experts.down_proj (E, D, I)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors = load_file(path)
        prefixes = sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k})
        for p in prefixes:
            get = lambda e, n: tensors.pop(f"{p}.experts.{e}.{n}.weight")  # noqa: E731
            gate_up = [np.concatenate([get(e, "gate_proj"), get(e, "up_proj")], axis=0) for e in range(num_experts)]
            tensors[f"{p}.experts.gate_up_proj"] = np.stack(gate_up)
            tensors[f"{p}.experts.down_proj"] = np.stack([get(e, "down_proj") for e in range(num_experts)])
        save_file(tensors, str(path), metadata={"format": "pt"})


def reshard(model_dir: Path, shards: int) -> None:
    """Split model.safetensors into ``shards`` files with an index, as large checkpoints come."""
    model_dir = Path(model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (model_dir / "model.safetensors").unlink()
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_checkpoint(
    out_dir: Path,
    *,
    seed: int = 0,
    layout: str = "per_expert",
    multimodal: bool = False,
    shards: int = 1,
    **overrides: Any,
) -> Tuple[Path, torch.nn.Module]:
    """Save a random float32 Qwen3.5-MoE checkpoint; returns (directory, transformers model in eval mode).

    ``multimodal`` saves ``Qwen3_5MoeForConditionalGeneration`` (model_type qwen3_5_moe, with a
    tiny vision tower and ``model.language_model.*`` names), otherwise the text-only class.
    ``layout="fused"`` rewrites the experts as the official checkpoints store them; ``shards``
    splits the weights over several files with an index (a layer's tensors may straddle files).
    """
    torch.manual_seed(seed)
    tcfg = text_config(**overrides)
    if multimodal:
        cfg = Qwen3_5MoeConfig(
            text_config=tcfg.to_dict(),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=tcfg.hidden_size),
        )
        model = Qwen3_5MoeForConditionalGeneration(cfg)
    else:
        model = Qwen3_5MoeForCausalLM(tcfg)
    perturb(model, seed)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    if layout == "fused":
        fuse_experts(out_dir, tcfg.num_experts)
    elif layout != "per_expert":
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    if shards > 1:
        reshard(out_dir, shards)
    return out_dir, model


def reference_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
# The shipped demo model's template (Qwen3.5's enable_thinking switch: an empty think block
# when thinking is off), so the tests render what users of the bundled model get.
CHAT_TEMPLATE = json.loads((default_model_dir() / "tokenizer_config.json").read_text())["chat_template"]
_WORDS = (
    "the a model token expert router layer hello world user assistant system prompt answer "
    "question think fast small mixture of experts gated delta attention cache stream text"
).split()


def _corpus(lines: int = 400) -> list:
    """Fixed text: the same on every run, so the tokenizer (and its ids) is too."""
    n = len(_WORDS)
    return [" ".join(_WORDS[(i * j + j) % n] for j in range(1, 10)) + f", {i}.\n" for i in range(lines)]


def make_tokenizer(out_dir: Path, vocab_size: int = 300) -> Dict[str, int]:
    """Write a byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json with a Qwen-style
    chat template) and generation_config.json (eos: <|im_end|>, <|endoftext|>) into ``out_dir``.

    ``vocab_size`` must not exceed the model's, and is at least 256 bytes + 5 added tokens.
    Returns the ids of the added tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + THINK_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": t in SPECIAL_TOKENS}
        for t, i in ids.items()
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation_config = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return ids


def add_mtp(model_dir: Path, seed: int = 1) -> None:
    """Give a checkpoint from ``make_checkpoint`` a random MTP head, as official checkpoints ship:
    ``mtp.fc.weight`` (H, 2H), the three ``mtp.*`` offset norms, and ``mtp.layers.0.*`` named
    and laid out (per-expert or fused) like the checkpoint's first full-attention layer; sets
    ``mtp_num_hidden_layers: 1`` in config.json. Works on single-file and sharded checkpoints."""
    import re

    model_dir = Path(model_dir)
    rng = np.random.default_rng(seed)
    index_path = model_dir / "model.safetensors.index.json"
    files = sorted(model_dir.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    attn = sorted({m.group(1) for k in tensors if (m := re.match(r"^(.*layers\.\d+)\.self_attn\.", k))})[0]

    def like(t: np.ndarray) -> np.ndarray:
        if t.ndim == 1:  # offset norms: around 0, like perturb leaves them
            return (rng.standard_normal(t.shape) * 0.1).astype(t.dtype)
        return (rng.standard_normal(t.shape) * max(float(t.std()), 1e-2)).astype(t.dtype)

    hidden = tensors[f"{attn}.input_layernorm.weight"]
    mtp = {f"mtp.layers.0.{k[len(attn) + 1:]}": like(v) for k, v in tensors.items() if k.startswith(attn + ".")}
    mtp["mtp.fc.weight"] = (rng.standard_normal((hidden.size, 2 * hidden.size)) * 0.02).astype(hidden.dtype)
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{name}.weight"] = like(hidden)

    target = files[-1]
    save_file({**load_file(target), **mtp}, str(target), metadata={"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"].update({k: target.name for k in mtp})
        index_path.write_text(json.dumps(index, indent=2))
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.get("text_config", config)["mtp_num_hidden_layers"] = 1
    config_path.write_text(json.dumps(config, indent=2))
