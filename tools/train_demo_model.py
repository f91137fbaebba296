"""Train the small Qwen3.5-MoE demo model shipped in ``mlx_qwenmoe/default_model``.

Reproducible end to end on a CPU with PyTorch + transformers:

* data: the ``.py`` files of the running interpreter's standard library (offline on
  every machine; record the Python version, since another version is other data),
  split into train / held-out by a hash of each file's relative path;
* tokenizer: byte-level BPE trained with ``tokenizers`` on the training files;
* model: ``Qwen3_5MoeForCausalLM`` (Gated DeltaNet + full-attention layers, routed
  experts + shared expert) plus the multi-token-prediction (MTP) head Qwen3.5 defines,
  which transformers does not implement, so it is built here from transformers'
  own decoder-layer classes and saved under the official ``mtp.*`` names.

Stages write under ``--out`` (default ``/work/demo_train``) and are skipped when their
output exists, so re-running the same command resumes from the latest checkpoint.

Not imported by the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING

# Must be set before tokenizers / torch spin up their pools: the run uses one core.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.numpy import load_file as load_np  # noqa: E402
from safetensors.numpy import save_file as save_np  # noqa: E402
from safetensors.torch import load_file as load_pt  # noqa: E402
from safetensors.torch import save_file as save_pt  # noqa: E402
from torch import nn  # noqa: E402

if TYPE_CHECKING:
    from transformers import Qwen3_5MoeTextConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Think tags get their own ids, as in Qwen3.5, so the chat template's empty
# think block costs a few tokens instead of a dozen byte pieces.
EXTRA_TOKENS = ["<think>", "</think>"]
# Qwen3.5's pre-tokenizer split (transformers' models/qwen3_5/tokenization_qwen3_5.py).
QWEN35_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
HELDOUT_MODULUS = 25  # 1 file in 25 (by path hash) is held out
# Weight of the MTP cross-entropy in the total loss: DeepSeek-V3's value for most of
# its run. The head matters here (it is the draft model for speculative decoding), but
# the main next-token loss must stay dominant since the MTP gradient also flows into
# the shared trunk, embedding and lm_head.
MTP_LOSS_WEIGHT = 0.3
# Switch-style load balancing, 10x Qwen's 0.001: in a short run, experts the router
# stops picking early never get trained, and the demo should exercise all of them.
AUX_LOSS_COEF = 0.01

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


# ----------------------------------------------------------------------------- data


def stdlib_files(root: Path) -> list[Path]:
    """Standard-library sources, sorted so every machine sees the same order.

    Test suites and third-party packages are left out: the first are large and
    unidiomatic (generated data, deliberately broken code), the second differ
    between installations.
    """
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel: str) -> bool:
    """Deterministic file-level split: independent of file order and content."""
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def read_corpus(root: Path) -> tuple[list[str], list[str], list[str]]:
    """Return (train texts, held-out texts, held-out relative paths)."""
    train, held, held_names = [], [], []
    for p in stdlib_files(root):
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if is_heldout(rel):
            held.append(text)
            held_names.append(rel)
        else:
            train.append(text)
    return train, held, held_names


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE saved in the PreTrainedTokenizerFast layout."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # transformers maps model_type qwen3_5_moe* to Qwen3_5Tokenizer, which rebuilds the
    # pipeline with these exact components whatever tokenizer.json says, so training with
    # anything else would make AutoTokenizer (and mlx-lm) split text differently.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS + EXTRA_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    write_tokenizer_config(out_dir)


def write_tokenizer_config(out_dir: Path) -> None:
    added = {}
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    for entry in tok["added_tokens"]:
        added[str(entry["id"])] = {
            "content": entry["content"],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": entry["content"] in SPECIAL_TOKENS,
        }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def encode_docs(tok_dir: Path, texts: list[str]) -> np.ndarray:
    """Concatenate documents, each followed by <|endoftext|>, as uint16 ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eot)
    return np.asarray(out, dtype=np.uint16)


def prepare_data(out: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    data_file = out / "data" / "tokens.safetensors"
    tok_dir = out / "tokenizer"
    if not data_file.exists():
        root = Path(sysconfig.get_paths()["stdlib"])
        train, held, held_names = read_corpus(root)
        print(f"corpus: {root} python {sys.version.split()[0]}: {len(train)} train files "
              f"({sum(map(len, train))} chars), {len(held)} held-out files "
              f"({sum(map(len, held))} chars)", flush=True)
        if not (tok_dir / "tokenizer.json").exists():
            t0 = time.time()
            train_tokenizer(train, vocab_size, tok_dir)
            print(f"tokenizer trained in {time.time() - t0:.0f}s", flush=True)
        tr, he = encode_docs(tok_dir, train), encode_docs(tok_dir, held)
        data_file.parent.mkdir(parents=True, exist_ok=True)
        save_np({"train": tr, "heldout": he}, str(data_file))
        meta = {
            "stdlib": str(root),
            "python": sys.version.split()[0],
            "train_files": len(train),
            "heldout_files": held_names,
            "train_chars": sum(map(len, train)),
            "heldout_chars": sum(map(len, held)),
            "train_tokens": int(tr.size),
            "heldout_tokens": int(he.size),
        }
        (out / "data" / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    d = load_np(str(data_file))
    return d["train"], d["heldout"]


# ---------------------------------------------------------------------------- model


def make_config(args: argparse.Namespace, tok_dir: Path) -> "Qwen3_5MoeTextConfig":
    from transformers import Qwen3_5MoeTextConfig

    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {e["content"]: e["id"] for e in tok["added_tokens"]}
    n_layers = args.layers
    # Every 4th layer is full attention, as in the released models (3, 7, ...).
    layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n_layers)]
    return Qwen3_5MoeTextConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=n_layers,
        layer_types=layer_types,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        linear_num_key_heads=args.lin_k_heads,
        linear_num_value_heads=args.lin_v_heads,
        linear_key_head_dim=args.lin_head_dim,
        linear_value_head_dim=args.lin_head_dim,
        linear_conv_kernel_dim=4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_inter,
        shared_expert_intermediate_size=args.shared_inter,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        router_aux_loss_coef=AUX_LOSS_COEF,
        mtp_num_hidden_layers=1,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


class MTPHead(nn.Module):
    """Qwen3.5's multi-token-prediction block (``mtp.*`` in official checkpoints).

    Slot t combines the main model's final (post-``model.norm``) hidden state at t
    with the embedding of token t+1, runs one full-attention MoE decoder layer at
    RoPE position t, and the shared lm_head then predicts token t+2.
    """

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
            Qwen3_5MoeDecoderLayer,
            Qwen3_5MoeRMSNorm,
        )

        h, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5MoeRMSNorm(h, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5MoeRMSNorm(h, eps=eps)
        # layer_idx only selects the block type (and a cache slot at inference):
        # any full-attention index gives the class and key names of a main attention layer.
        full_idx = config.layer_types.index("full_attention")
        self.layers = nn.ModuleList([Qwen3_5MoeDecoderLayer(config, full_idx)])
        self.norm = Qwen3_5MoeRMSNorm(h, eps=eps)

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        for layer in self.layers:
            x = layer(x, position_embeddings=position_embeddings, attention_mask=None)
        return self.norm(x)


class DemoModel(nn.Module):
    """Main causal LM + MTP head, computing the combined training loss."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import Qwen3_5MoeForCausalLM

        self.lm = Qwen3_5MoeForCausalLM(config)
        self.mtp = MTPHead(config)
        for m in self.mtp.modules():
            self.lm._init_weights(m)
        self.config = config
        self._router_logits: list[torch.Tensor] = []
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTopKRouter

        for m in self.modules():
            if isinstance(m, Qwen3_5MoeTopKRouter):
                m.register_forward_hook(lambda _m, _i, out: self._router_logits.append(out[0]))

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """ids: (B, T+1). Main CE over T next-token targets, MTP CE over T-1 targets."""
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

        self._router_logits.clear()
        x, y = ids[:, :-1], ids[:, 1:]
        base = self.lm.model
        h = base(input_ids=x, use_cache=False).last_hidden_state  # after model.norm
        logits = self.lm.lm_head(h)
        main = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

        b, t = x.shape
        pos = torch.arange(t - 1).view(1, 1, -1).expand(3, b, -1)
        nxt = base.embed_tokens(x[:, 1:])  # token t+1 for slot t
        m = self.mtp(h[:, :-1], nxt, base.rotary_emb(nxt, pos))
        mtp_logits = self.lm.lm_head(m)
        mtp = F.cross_entropy(mtp_logits.flatten(0, 1).float(), y[:, 1:].flatten())

        aux = load_balancing_loss_func(
            tuple(self._router_logits), self.config.num_experts, self.config.num_experts_per_tok
        )
        self._router_logits.clear()
        total = main + MTP_LOSS_WEIGHT * mtp + AUX_LOSS_COEF * aux
        return {"loss": total, "main": main, "mtp": mtp, "aux": aux}


def split_expert_tensors(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused (E, 2I, H) / (E, H, I) expert tensors -> the per-expert names checkpoints use."""
    out = {}
    for k, v in state.items():
        name = prefix + k
        if k.endswith("mlp.experts.gate_up_proj"):
            stem = name[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{stem}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            stem = name[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[name] = v.contiguous()
    return out


# ------------------------------------------------------------------------- training


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def batch_at(tokens: np.ndarray, step: int, args: argparse.Namespace) -> torch.Tensor:
    """Random windows; a function of (seed, step) alone so a resumed run sees the same data."""
    rng = np.random.default_rng([args.seed, step])
    starts = rng.integers(0, tokens.size - args.seq - 1, size=args.batch)
    return torch.from_numpy(np.stack([tokens[s : s + args.seq + 1] for s in starts]).astype(np.int64))


def heldout_batches(tokens: np.ndarray, args: argparse.Namespace) -> list[torch.Tensor]:
    """A fixed set of evenly spaced held-out windows."""
    n = args.eval_batches * args.batch
    span = args.seq + 1
    starts = np.linspace(0, tokens.size - span - 1, n).astype(np.int64)
    rows = np.stack([tokens[s : s + span] for s in starts]).astype(np.int64)
    return [torch.from_numpy(rows[i : i + args.batch]) for i in range(0, n, args.batch)]


@torch.no_grad()
def evaluate(model: DemoModel, batches: list[torch.Tensor]) -> dict[str, float]:
    model.eval()
    tot = {"main": 0.0, "mtp": 0.0}
    for b in batches:
        r = model.losses(b)
        tot["main"] += r["main"].item()
        tot["mtp"] += r["mtp"].item()
    model.train()
    return {k: v / len(batches) for k, v in tot.items()}


def save_checkpoint(path: Path, model: DemoModel, opt: torch.optim.Optimizer, step: int, log: dict) -> None:
    """Weights + AdamW moments as safetensors, counters as JSON; written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_pt({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    moments, steps = {}, {}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if st:
            moments[name + "::exp_avg"] = st["exp_avg"]
            moments[name + "::exp_avg_sq"] = st["exp_avg_sq"]
            steps[name] = float(st["step"])
    save_pt(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "adam_steps": steps, "log": log}) + "\n")
    if path.exists():
        old = path.with_name(path.name + ".old")
        path.rename(old)
        tmp.rename(path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(path)


def load_checkpoint(path: Path, model: DemoModel, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    model.load_state_dict(load_pt(str(path / "model.safetensors")))
    state = json.loads((path / "state.json").read_text())
    moments = load_pt(str(path / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        if name in state["adam_steps"]:
            opt.state[p] = {
                "step": torch.tensor(state["adam_steps"][name]),
                "exp_avg": moments[name + "::exp_avg"],
                "exp_avg_sq": moments[name + "::exp_avg_sq"],
            }
    return state["step"], state["log"]


def export_final(model: DemoModel, tok_dir: Path, dest: Path, summary: dict) -> None:
    """HF layout: save_pretrained for the main model, then add mtp.* to its safetensors."""
    from safetensors import safe_open
    from transformers import GenerationConfig

    dest.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(dest))
    st_path = dest / "model.safetensors"
    with safe_open(str(st_path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors.update(split_expert_tensors("mtp.", model.mtp.state_dict()))
    save_pt(tensors, str(st_path), metadata=metadata or {"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_bytes((tok_dir / name).read_bytes())
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {e["content"]: e["id"] for e in tok["added_tokens"]}
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
    ).save_pretrained(str(dest))
    (dest / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/work/demo_train"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=160)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--lin-k-heads", type=int, default=4)
    ap.add_argument("--lin-v-heads", type=int, default=8)
    ap.add_argument("--lin-head-dim", type=int, default=32)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=128)
    ap.add_argument("--shared-inter", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bench", type=int, default=0, help="time this many steps, then exit (no checkpoints)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    train_tok, held_tok = prepare_data(out, args.vocab)
    print(f"tokens: train {train_tok.size}, held-out {held_tok.size}", flush=True)

    config = make_config(args, out / "tokenizer")
    model = DemoModel(config)
    n_params = count_params(model)
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"params: total {n_params / 1e6:.2f}M (routed experts {n_expert / 1e6:.2f}M, "
          f"mtp {count_params(model.mtp) / 1e6:.2f}M)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    ckpt = out / "checkpoint"
    step, log = 0, {"train": [], "eval": [], "elapsed_s": 0.0}
    if ckpt.exists() and not args.bench:
        step, log = load_checkpoint(ckpt, model, opt)
        print(f"resumed from {ckpt} at step {step}", flush=True)
    (out / "run_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1) + "\n")

    evals = heldout_batches(held_tok, args)
    tokens_per_step = args.batch * args.seq
    t_start, elapsed0 = time.time(), log["elapsed_s"]
    t_last, run_loss, run_n = time.time(), 0.0, 0
    end = args.bench if args.bench else args.steps
    model.train()
    while step < end:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        r = model.losses(batch_at(train_tok, step, args))
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += r["main"].item()
        run_n += 1
        if args.bench:
            dt = time.time() - t_last
            print(f"bench step {step}: {dt:.2f}s ({tokens_per_step / dt:.0f} tok/s) loss {r['main'].item():.3f}",
                  flush=True)
            t_last = time.time()
            continue
        if step % 20 == 0:
            dt = time.time() - t_last
            entry = {"step": step, "main": run_loss / run_n, "mtp": r["mtp"].item(), "aux": r["aux"].item(),
                     "gnorm": float(gnorm), "lr": lr_at(step - 1, args), "tok_s": run_n * tokens_per_step / dt}
            log["train"].append(entry)
            print(json.dumps(entry), flush=True)
            t_last, run_loss, run_n = time.time(), 0.0, 0
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, evals)
            log["eval"].append({"step": step, "heldout_main": ev["main"], "heldout_mtp": ev["mtp"]})
            print(json.dumps(log["eval"][-1]), flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            log["elapsed_s"] = elapsed0 + time.time() - t_start
            save_checkpoint(ckpt, model, opt, step, log)

    if args.bench:
        return
    summary = {
        "python": sys.version.split()[0],
        "steps": step,
        "tokens_seen": step * tokens_per_step,
        "params": n_params,
        "train_seconds": log["elapsed_s"],
        "final_train_main_loss": log["train"][-1]["main"] if log["train"] else None,
        "final_heldout": log["eval"][-1] if log["eval"] else None,
        "mtp_loss_weight": MTP_LOSS_WEIGHT,
        "aux_loss_coef": AUX_LOSS_COEF,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    export_final(model, out / "tokenizer", out / "final", summary)
    print(f"final checkpoint written to {out / 'final'}", flush=True)


if __name__ == "__main__":
    main()
