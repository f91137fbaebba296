"""Held-out perplexity of a Hugging Face-format demo checkpoint, computed with transformers.

    python tools/eval_demo_model.py /work/demo_train/final            # stdlib held-out split
    python tools/eval_demo_model.py CKPT --text mlx_qwenmoe/default_model/heldout_sample.txt

Text is tokenized with the checkpoint's own tokenizer through ``AutoTokenizer`` (the
path users and mlx-lm take), documents are joined with ``<|endoftext|>``, and the
stream is scored in non-overlapping windows of ``--seq`` targets, each window
starting fresh (no carried state), as in training. With ``--mtp`` the checkpoint's
``mtp.*`` tensors are loaded into the training script's MTP head and its
two-tokens-ahead loss is reported too, which also checks that those tensors
round-trip. With ``--mlx`` the checkpoint (e.g. a converted, quantized one) is
scored by this package's MLX model instead, on the same token windows, so the
numbers are comparable. Prints one JSON object.

Not imported by the package.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_demo_model as train  # noqa: E402


def load_mtp(ckpt: Path, config) -> train.MTPHead:
    """Rebuild the MTP head from per-expert ``mtp.*`` tensors (fusing experts as transformers does)."""
    from safetensors import safe_open

    head = train.MTPHead(config)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        raw = {k[len("mtp."):]: f.get_tensor(k) for k in f.keys() if k.startswith("mtp.")}
    state, n_exp = {}, config.num_experts
    for k, v in raw.items():
        if ".mlp.experts." not in k:
            state[k] = v
    for layer in range(len(head.layers)):
        stem = f"layers.{layer}.mlp.experts."
        state[stem + "gate_up_proj"] = torch.stack(
            [torch.cat([raw[f"{stem}{e}.gate_proj.weight"], raw[f"{stem}{e}.up_proj.weight"]]) for e in range(n_exp)]
        )
        state[stem + "down_proj"] = torch.stack([raw[f"{stem}{e}.down_proj.weight"] for e in range(n_exp)])
    head.load_state_dict(state, strict=True)
    return head.eval()


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(ckpt: Path, texts: list[str], seq: int = 256, batch: int = 8, mtp: bool = False) -> dict:
    """Mean next-token NLL / perplexity (and optionally the MTP head's) over ``texts``."""
    from transformers import AutoTokenizer, Qwen3_5MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = Qwen3_5MoeForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    head = load_mtp(ckpt, model.config) if mtp else None
    stream = token_stream(tok, texts)
    n_win = (stream.numel() - 1) // seq
    windows = torch.stack([stream[i * seq : i * seq + seq + 1] for i in range(n_win)])
    nll, n, mtp_nll, mtp_n, mtp_hit = 0.0, 0, 0.0, 0, 0
    for i in range(0, n_win, batch):
        w = windows[i : i + batch]
        x, y = w[:, :-1], w[:, 1:]
        h = model.model(input_ids=x, use_cache=False).last_hidden_state
        logits = model.lm_head(h).float()
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        n += y.numel()
        if head is not None:
            b, t = x.shape
            pos = torch.arange(t - 1).view(1, 1, -1).expand(3, b, -1)
            nxt = model.model.embed_tokens(x[:, 1:])
            m_logits = model.lm_head(head(h[:, :-1], nxt, model.model.rotary_emb(nxt, pos))).float()
            target = y[:, 1:]
            mtp_nll += F.cross_entropy(m_logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            mtp_hit += (m_logits.argmax(-1) == target).sum().item()
            mtp_n += target.numel()
    out = {"checkpoint": str(ckpt), "tokens_scored": n, "seq": seq, "nll": nll / n, "ppl": math.exp(nll / n)}
    if head is not None:
        out.update(mtp_nll=mtp_nll / mtp_n, mtp_ppl=math.exp(mtp_nll / mtp_n), mtp_top1_acc=mtp_hit / mtp_n)
    return out


def mlx_perplexity(ckpt: Path, texts: list[str], seq: int = 256, batch: int = 8) -> dict:
    """Same windows and tokenizer as ``perplexity``, scored by ``mlx_qwenmoe``'s model (float32)."""
    import mlx.core as mx
    from transformers import AutoTokenizer

    from mlx_qwenmoe import load

    model, _ = load(ckpt, dtype=mx.float32)
    stream = token_stream(AutoTokenizer.from_pretrained(str(ckpt)), texts)
    n_win = (stream.numel() - 1) // seq
    windows = mx.array(torch.stack([stream[i * seq : i * seq + seq + 1] for i in range(n_win)]).numpy())
    nll, n = 0.0, 0
    for i in range(0, n_win, batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1]).astype(mx.float32)
        target = w[:, 1:]
        picked = mx.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        nll += (mx.logsumexp(logits, axis=-1) - picked).sum().item()
        n += target.size
    return {"checkpoint": str(ckpt), "backend": "mlx_qwenmoe", "tokens_scored": n, "seq": seq,
            "nll": nll / n, "ppl": math.exp(nll / n)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--text", type=Path, nargs="*", help="files to score (default: the stdlib held-out split)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mtp", action="store_true", help="also score the mtp.* head")
    ap.add_argument("--mlx", action="store_true", help="score with mlx_qwenmoe instead of transformers")
    ap.add_argument("--max-files", type=int, default=None, help="only the first N texts (MLX on CPU is slow)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.text:
        texts = [p.read_text(encoding="utf-8") for p in args.text]
    else:
        _, texts, _ = train.read_corpus(Path(sysconfig.get_paths()["stdlib"]))
    texts = texts[: args.max_files]
    if args.mlx:
        result = mlx_perplexity(args.checkpoint, texts, args.seq, args.batch)
    else:
        result = perplexity(args.checkpoint, texts, args.seq, args.batch, args.mtp)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
