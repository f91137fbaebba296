"""Qwen3.5-MoE text model (also Qwen3.6 and Qwen3-Next) in MLX.

Three Gated DeltaNet layers for every gated full-attention layer, each followed
by a sparse MoE block (softmax router, top-k, shared expert). Parameter names
and layout follow mlx-lm's ``qwen3_5_moe`` so checkpoints move between the two
tools; the multi-token-prediction head (``mtp.*``), which mlx-lm drops, is kept.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import precise_swiglu, swiglu
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.switch_layers import SwitchGLU

from .cache import AttentionCache, DeltaNetCache
from .checkpoint import EIGHT_BIT_GROUP_SIZE, hf_to_mlx, is_eight_bit, keeps_float32
from .config import ModelArgs
from .ops.gated_delta import gated_delta_update
from .ops.moe import route, routed_experts


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) * w * silu(z), the gating in float32; unlike the other norms, w is not stored as an offset."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        # rms_norm accumulates in float32 whatever x's dtype (as transformers does); the compiled
        # gate is one kernel on Metal where the separate casts, silu and product were five.
        return precise_swiglu(x, z, mx.fast.rms_norm(x, self.weight, self.eps))


@partial(mx.compile, shapeless=True)
def sigmoid_gate(x: mx.array, gate: mx.array) -> mx.array:
    """Gated attention's output gate, one kernel on Metal."""
    return x * mx.sigmoid(gate)


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_k_heads = args.linear_num_key_heads
        self.num_v_heads = args.linear_num_value_heads
        self.head_k_dim = args.linear_key_head_dim
        self.head_v_dim = args.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_kernel_size = args.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim

        self.in_proj_qkv = nn.Linear(args.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(args.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(args.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(args.hidden_size, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim, bias=False
        )
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.zeros((self.num_v_heads,))
        self.norm = GatedRMSNorm(self.head_v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, args.hidden_size, bias=False)

    def __call__(
        self, x: mx.array, cache: Optional[DeltaNetCache] = None, mask: Optional[mx.array] = None
    ) -> mx.array:
        """mask: (B, S) bool, False at batch padding (mlx-lm's ``cache.make_mask``)."""
        B, S, _ = x.shape
        qkv = self.in_proj_qkv(x)
        if mask is not None:
            # padding enters the conv window as the zeros a fresh conv state holds
            qkv = mx.where(mask[..., None], qkv, 0)
        z = self.in_proj_z(x).reshape(B, S, self.num_v_heads, self.head_v_dim)
        b = self.in_proj_b(x)
        a = self.in_proj_a(x)

        conv_state = cache.conv_state if cache is not None else None
        if conv_state is None:
            conv_state = mx.zeros((B, self.conv_kernel_size - 1, self.conv_dim), dtype=qkv.dtype)
        conv_in = mx.concatenate([conv_state, qkv], axis=1)
        if cache is not None and cache.lengths is not None:
            # right-padded rows (mlx-lm's batched prompts) keep the window ending at their length
            ends = mx.clip(cache.lengths, 0, S)[:, None] + mx.arange(self.conv_kernel_size - 1)
            cache[0] = mx.take_along_axis(conv_in, ends[..., None], axis=1)
        elif cache is not None:
            # contiguous: do not keep the whole prompt's projection alive through a slice view
            cache[0] = mx.contiguous(conv_in[:, 1 - self.conv_kernel_size :])
        conv_out = nn.silu(self.conv1d(conv_in))

        q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, S, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, S, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, S, self.num_v_heads, self.head_v_dim)

        if cache is None:
            out, _ = gated_delta_update(q, k, v, a, b, self.A_log, self.dt_bias, None, mask)
        else:
            out = cache.delta_update(conv_in, q, k, v, a, b, self.A_log, self.dt_bias, mask)
            cache.advance(S)
        out = self.norm(out, z)
        return self.out_proj(out.reshape(B, S, self.value_dim))


class Attention(nn.Module):
    """Gated full attention: q_proj carries, per head, the query and a sigmoid output gate."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.rope_dims = args.rope_dims
        self.rope_theta = args.rope_theta
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, 2 * self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(
            x, self.rope_dims, traditional=False, base=self.rope_theta, scale=1.0, offset=offset
        )

    def __call__(
        self, x: mx.array, cache: Optional[AttentionCache] = None, mask: Optional[Any] = None
    ) -> mx.array:
        """mask: None for causal, else what mlx-lm's ``cache.make_mask`` gives (per-row padding)."""
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.num_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q, k = self._rope(q, offset), self._rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if mask is None and L > 1:
            # "causal" aligns the mask to the last query, so it holds with a cache prefix too.
            mask = "causal"
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(sigmoid_gate(out, gate.reshape(B, L, -1)))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # mlx-lm's compiled swiglu: silu and the product as one fused op, not two
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class SparseMoeBlock(nn.Module):
    # set by expert_stream.stream_experts: a routed_experts substitute over a pool of expert slots
    streamed: Optional[Any] = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        weights, inds = route(self.gate(x), self.top_k, self.norm_topk_prob)
        # the shared expert goes in too, so the Metal decode kernels fuse it with the routed ones
        run = routed_experts if self.streamed is None else self.streamed
        return run(x, inds, weights, self.switch_mlp, self.shared_expert, self.shared_expert_gate)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, is_linear: bool, is_sparse: bool):
        super().__init__()
        self.is_linear = is_linear
        if is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = SparseMoeBlock(args) if is_sparse else MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, x: mx.array, cache: Any = None, mask: Optional[Any] = None) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def make_cache(self) -> Any:
        return DeltaNetCache() if self.is_linear else AttentionCache()


class Qwen3_5TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, args.is_linear(i), args.is_sparse(i)) for i in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, inputs: mx.array, cache: Optional[List[Any]] = None, input_embeddings: Optional[mx.array] = None
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        masks = self._padding_masks(h, cache)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c, masks[layer.is_linear])
        return self.norm(h)

    def _padding_masks(self, h: mx.array, cache: List[Any]) -> Dict[bool, Any]:
        """{is_linear: mask} from the first cache of each kind, as mlx-lm's qwen3_5 does:
        None (causal, nothing padded) unless the caches are mlx-lm batch caches with padding."""
        first = {}
        for layer, c in zip(self.layers, cache):
            first.setdefault(layer.is_linear, c)
        return {
            True: create_ssm_mask(h, first.get(True)),
            False: create_attention_mask(h, first.get(False)) if first.get(False) is not None else None,
        }


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Qwen3_5TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)


class MTPHead(nn.Module):
    """Qwen3.5's multi-token-prediction layer: from the final hidden state at t and the
    embedding of token t+1, a hidden state whose logits predict token t+2."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        h = args.hidden_size
        self.pre_fc_norm_embedding = nn.RMSNorm(h, eps=args.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(h, eps=args.rms_norm_eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = [
            DecoderLayer(args, is_linear=False, is_sparse=args.num_experts > 0)
            for _ in range(args.mtp_num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(h, eps=args.rms_norm_eps)

    def __call__(self, hidden: mx.array, next_embeddings: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        h = self.fc(
            mx.concatenate(
                [self.pre_fc_norm_embedding(next_embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
            )
        )
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, c)
        return self.norm(h)


def check_token_ids(inputs: mx.array, vocab_size: int) -> None:
    """Raise ``ValueError`` unless ``inputs`` is a non-empty integer array of ids in [0, vocab_size):
    MLX's embedding lookup does not check, and an id past the table reads foreign memory."""
    if not isinstance(inputs, mx.array) or not mx.issubdtype(inputs.dtype, mx.integer):
        raise ValueError(f"token ids must be an integer mx.array, got {getattr(inputs, 'dtype', type(inputs).__name__)}")
    if inputs.size == 0:
        raise ValueError(f"token ids must not be empty (shape {tuple(inputs.shape)})")
    try:
        low, high = mx.min(inputs).item(), mx.max(inputs).item()
    except ValueError:  # inside mx.compile or an export: the values are not known yet
        return
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


class Model(nn.Module):
    """The causal LM: ``model(inputs, cache=...)`` returns logits, as in mlx-lm."""

    def __init__(self, args: ModelArgs, with_mtp: bool = False):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.language_model = TextModel(args)
        if with_mtp and args.mtp_num_hidden_layers > 0:
            self.mtp = MTPHead(args)

    def __call__(
        self, inputs: mx.array, cache: Optional[List[Any]] = None, input_embeddings: Optional[mx.array] = None
    ) -> mx.array:
        """Logits. A prompt's ``inputs`` (more than one token a row) are checked against the
        vocabulary; one token a row is what a sampler drew, and reading its value here would stall
        the pipelined decode loops of mlx-lm and ours (``hidden`` trusts its caller throughout)."""
        if input_embeddings is None and (inputs.ndim == 0 or inputs.shape[-1] != 1):
            check_token_ids(inputs, self.args.vocab_size)
        return self.language_model.logits(self.hidden(inputs, cache, input_embeddings))

    def hidden(
        self, inputs: mx.array, cache: Optional[List[Any]] = None, input_embeddings: Optional[mx.array] = None
    ) -> mx.array:
        """Final (normed) hidden states: what the head and the MTP layer read."""
        return self.language_model.model(inputs, cache, input_embeddings)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.language_model.logits(hidden)

    def embed(self, tokens: mx.array) -> mx.array:
        """Token embeddings (what the MTP head pairs with hidden states)."""
        return self.language_model.model.embed_tokens(tokens)

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self

    @property
    def layers(self) -> List[DecoderLayer]:
        return self.language_model.model.layers

    def make_cache(self) -> List[Any]:
        return [layer.make_cache() for layer in self.layers]

    def make_mtp_cache(self) -> List[Any]:
        return [layer.make_cache() for layer in self.mtp.layers]

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map a Hugging Face or mlx-lm checkpoint's tensors to this module's names and layouts."""
        from_hf = any(k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in weights.items())
        weights = hf_to_mlx(weights, self.args, from_hf=from_hf)
        if not self.has_mtp:
            weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
        return weights

    @property
    def quant_predicate(self):
        """The converter's rule (``checkpoint.EIGHT_BIT_MODULES``), so ``mlx_lm.convert`` of this
        model quantizes as ``mlx_qwenmoe convert`` does."""

        def predicate(path: str, _module: nn.Module):
            if is_eight_bit(path):
                return {"group_size": EIGHT_BIT_GROUP_SIZE, "bits": 8}
            return True

        return predicate

    @property
    def cast_predicate(self):
        return lambda path: not keeps_float32(path)
