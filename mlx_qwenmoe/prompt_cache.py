"""Prompt cache for the hybrid model: reuse the longest shared prefix across requests.

Attention KV can be cut back to any prefix, a DeltaNet state cannot: the state after token t
is not recoverable from a later one. So the cache is a token trie (a radix tree) whose edges
hold the attention KV of their tokens, stored once however many sequences share them, and
whose checkpoints hold every DeltaNet layer's (conv, recurrent) state at chosen depths:
every ``checkpoint_interval`` tokens, where each chat message begins (``boundaries``), where a
prompt leaves the cached sequences it shares a prefix with, at the end of each prompt and of
each generation. A lookup resumes from the deepest checkpoint at or
before the longest common prefix; the checkpoints of the rest are taken at prefill chunk ends,
without extra forward passes. With an MTP head, edges also hold the MTP layer's KV and
checkpoints the final hidden state its next slot reads.

Memory is bounded by ``max_bytes``: the least recently used checkpoint goes first, and with
it any branch of the trie no checkpoint needs any more. ``bytes`` counts every stored array
exactly (slices are copied, never views of a larger buffer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import AttentionCache, DeltaNetCache
from .errors import PromptCacheError
from .generate import generate_step

__all__ = ["PromptCache", "default_max_bytes"]

FORMAT = "mlx_qwenmoe.prompt_cache/1"
FREE_MEMORY_FRACTION = 0.25
MIN_CHECKPOINT_INTERVAL = 256
INTERVAL, BOUNDARY, END = 0, 1, 2  # checkpoint kinds, the first evicted first
KV = Tuple[mx.array, mx.array]


def free_memory_bytes() -> int:
    """Memory the process could still use: Metal's recommended working set less what MLX holds,
    else the kernel's MemAvailable, else free pages."""
    if mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"]) - mx.get_active_memory()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_bytes() -> int:
    """The default budget: a quarter of the free memory."""
    return int(FREE_MEMORY_FRACTION * free_memory_bytes())


def _copy(x: mx.array) -> mx.array:
    """A slice as its own buffer, so that keeping it does not keep the array it came from."""
    return mx.contiguous(x)


@dataclass
class _Checkpoint:
    states: List[Tuple[mx.array, mx.array]]  # per DeltaNet layer: (conv, recurrent)
    hidden: Optional[mx.array]  # (1, 1, H) final hidden of the last token, for the MTP head
    used: int = 0
    rank: int = 0  # eviction order among equally recent ones: INTERVAL, BOUNDARY, END

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.states) + (0 if self.hidden is None else self.hidden.nbytes)


class _Node:
    """An edge of the trie: tokens at depths [start, end), their KV (1, H, n, D) per attention
    layer, the MTP KV of depths [max(start, 1), end) (slot t sits at depth t + 1, the token it
    reads), and checkpoints keyed by depth d in (start, end], the state after tokens [0, d)."""

    def __init__(self, tokens: List[int], start: int, parent: Optional["_Node"], kv: List[KV], mtp: Optional[List[KV]]):
        self.tokens, self.start, self.parent = tokens, start, parent
        self.kv, self.mtp = kv, mtp
        self.children: Dict[int, _Node] = {}
        self.checkpoints: Dict[int, _Checkpoint] = {}

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def mtp_start(self) -> int:
        return max(self.start, 1)

    @property
    def kv_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv + (self.mtp or []))


def _slice_kv(kv: List[KV], lo: int, hi: int) -> List[KV]:
    return [(_copy(k[:, :, lo:hi]), _copy(v[:, :, lo:hi])) for k, v in kv]


def _joined_kv(pieces: List[List[KV]], layer: int) -> KV:
    if len(pieces) == 1:
        return pieces[0][layer]
    return tuple(mx.concatenate([p[layer][i] for p in pieces], axis=2) for i in range(2))


@dataclass
class _Hit:
    depth: int  # tokens the caches hold
    match: int  # tokens shared with the cache (at most all but the last)
    cache: List[Any]
    mtp_cache: Optional[List[Any]]
    hidden: Optional[mx.array]


def model_fingerprint(model: Any) -> str:
    """Config, tensor names/shapes/dtypes (so quantization) and a sample of weight values."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.args), sort_keys=True, default=str).encode())
    params = tree_flatten(model.parameters())
    for name, p in params:
        h.update(f"{name}{tuple(p.shape)}{p.dtype};".encode())
    sample = [p.reshape(-1)[:16].astype(mx.float32) for _, p in params[:: max(1, len(params) // 16)]]
    h.update(np.array(mx.concatenate(sample)).tobytes())
    return h.hexdigest()


class PromptCache:
    """Prefixes of earlier sequences (prompts and generations) of one model, to resume from.

    ``max_bytes`` None: ``default_max_bytes()``, a quarter of the free memory. Use it through
    ``stream_generate(..., prompt_cache=cache)``.

    ``checkpoint_interval`` None: 256 tokens, or for a model whose checkpoint weighs more than
    256 tokens of KV, the power of two at which checkpoints weigh at most the KV they cover (so
    they at most double a cached sequence's bytes): 256 for the demo model (a checkpoint is
    228 tokens of KV), 4096 for Qwen3.5-35B-A3B (61 MiB, 3144 tokens of KV). See
    benchmarks/README.md for the measurements behind it.
    """

    def __init__(self, model: Any, max_bytes: Optional[int] = None, checkpoint_interval: Optional[int] = None):
        self.model = model
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        template = model.make_cache()
        self._attn = [i for i, c in enumerate(template) if isinstance(c, AttentionCache)]
        self._delta = [i for i, c in enumerate(template) if isinstance(c, DeltaNetCache)]
        self._mtp = bool(getattr(model, "has_mtp", False))
        emb = model.language_model.model.embed_tokens
        self._itemsize = getattr(emb, "scales", emb.weight).dtype.size  # the activations' dtype
        if checkpoint_interval is None:
            parity = -(-self.checkpoint_bytes // self.kv_bytes_per_token)
            checkpoint_interval = max(MIN_CHECKPOINT_INTERVAL, 1 << (parity - 1).bit_length())
        if checkpoint_interval < 1:
            raise PromptCacheError(f"checkpoint_interval must be at least 1, not {checkpoint_interval}")
        self.checkpoint_interval = checkpoint_interval
        one = self.checkpoint_bytes
        if self.max_bytes < one:
            raise PromptCacheError(f"max_bytes={self.max_bytes}: smaller than one checkpoint of this model ({one} bytes)")
        self._root = _Node([], 0, None, [], None)
        self._bytes = 0
        self._clock = 0
        self._counts = dict(lookups=0, hits=0, tokens_reused=0, tokens_computed=0, evictions=0)

    # ---- sizes and statistics ----

    @property
    def state_bytes(self) -> int:
        """Bytes of every DeltaNet layer's conv and float32 recurrent state: what a sequence
        holds besides its KV."""
        a = self.model.args
        conv_dim = 2 * a.linear_num_key_heads * a.linear_key_head_dim + a.linear_num_value_heads * a.linear_value_head_dim
        conv = (a.linear_conv_kernel_dim - 1) * conv_dim * self._itemsize
        recurrent = a.linear_num_value_heads * a.linear_value_head_dim * a.linear_key_head_dim * 4
        return len(self._delta) * (conv + recurrent)

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes of one checkpoint: the DeltaNet states, and the last hidden state with an MTP head."""
        return self.state_bytes + (self.model.args.hidden_size * self._itemsize if self._mtp else 0)

    @property
    def kv_bytes_per_token(self) -> int:
        """Attention KV bytes of one token (the MTP head's not counted)."""
        a = self.model.args
        return 2 * len(self._attn) * a.num_key_value_heads * a.head_dim * self._itemsize

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def stats(self) -> Dict[str, int]:
        """entries (cached sequences: trie leaves), nodes, checkpoints, bytes (kv_bytes +
        state_bytes), max_bytes, lookups, hits, tokens_reused, tokens_computed, evictions."""
        nodes = list(self._nodes())
        kv = sum(n.kv_bytes for n in nodes)
        return dict(
            entries=sum(not n.children for n in nodes),
            nodes=len(nodes),
            checkpoints=sum(len(n.checkpoints) for n in nodes),
            bytes=self._bytes,
            kv_bytes=kv,
            state_bytes=self._bytes - kv,
            max_bytes=self.max_bytes,
            **self._counts,
        )

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ---- lookup ----

    def _walk(self, tokens: Sequence[int], limit: int, split: bool = False) -> Tuple[List[_Node], int]:
        """Trie nodes along ``tokens`` and the common prefix length, capped at ``limit``; with
        ``split``, an edge the tokens leave midway is cut there, so a new branch can start."""
        node, depth, path = self._root, 0, []
        while depth < limit:
            child = node.children.get(tokens[depth])
            if child is None:
                break
            m = 0
            while m < len(child.tokens) and depth + m < limit and child.tokens[m] == tokens[depth + m]:
                m += 1
            if split and m < len(child.tokens) and depth + m < limit:
                child = self._split(child, depth + m)
            path.append(child)
            depth += m
            if m < len(child.tokens):
                break
            node = child
        return path, depth

    def lookup(self, tokens: Sequence[int], mtp: bool = False) -> _Hit:
        """Caches holding the deepest checkpointed prefix of ``tokens`` (at most all but the
        last token, whose logits the caller needs); depth 0 and fresh caches on a miss."""
        mtp = mtp and self._mtp  # without a head, mtp_generate_step says so
        path, match = self._walk(tokens, len(tokens) - 1)
        best, best_node, mtp_ok = None, None, True
        for node in path:
            for d, cp in node.checkpoints.items():
                usable = d <= match and (not mtp or (mtp_ok and node.mtp is not None and cp.hidden is not None))
                if usable and (best is None or d > best):
                    best, best_node = d, node
            mtp_ok = mtp_ok and node.mtp is not None
        self._counts["lookups"] += 1
        depth = best or 0
        cache = self.model.make_cache()
        mtp_cache = self.model.make_mtp_cache() if mtp else None
        hidden = None
        if best is not None:
            cp = best_node.checkpoints[best]
            cp.used = self._tick()
            used = [n for n in path if n.start < depth]
            pieces = [_slice_kv(n.kv, 0, min(n.end, depth) - n.start) for n in used]
            for j, i in enumerate(self._attn):
                cache[i].state = (*_joined_kv(pieces, j), depth)
            for j, i in enumerate(self._delta):
                cache[i].cache = list(cp.states[j])
            if mtp:
                hidden = cp.hidden
                pieces = [_slice_kv(n.mtp, 0, min(n.end, depth) - n.mtp_start) for n in used if n.end > n.mtp_start]
                for j, c in enumerate(mtp_cache):
                    if depth > 1:
                        c.state = (*_joined_kv(pieces, j), depth - 1)
            self._counts["hits"] += 1
            self._counts["tokens_reused"] += depth
        self._counts["tokens_computed"] += len(tokens) - depth
        return _Hit(depth, match, cache, mtp_cache, hidden)

    def checkpoint_depths(self, start: int, end: int, boundaries: Sequence[int] = ()) -> List[int]:
        """Depths in (start, end] where a prefill from ``start`` to ``end`` keeps a checkpoint."""
        step = self.checkpoint_interval
        every = range((start // step + 1) * step, end + 1, step)
        return sorted({*every, *(b for b in boundaries if start < b <= end), end} - {start})

    # ---- insertion and eviction ----

    def _split(self, node: _Node, depth: int) -> _Node:
        """Cut ``node`` at ``depth``; returns the new upper part (the lower keeps its children)."""
        m = depth - node.start
        upper = _Node(node.tokens[:m], node.start, node.parent, _slice_kv(node.kv, 0, m), None)
        if node.mtp is not None:
            cut = depth - node.mtp_start
            upper.mtp = _slice_kv(node.mtp, 0, cut)
            node.mtp = _slice_kv(node.mtp, cut, node.end - node.mtp_start)
        node.kv = _slice_kv(node.kv, m, len(node.tokens))
        upper.checkpoints = {d: cp for d, cp in node.checkpoints.items() if d <= depth}
        node.checkpoints = {d: cp for d, cp in node.checkpoints.items() if d > depth}
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.start, node.parent = node.tokens[m:], depth, upper
        upper.children = {node.tokens[0]: node}
        mx.eval([a for pair in upper.kv + node.kv + (upper.mtp or []) + (node.mtp or []) for a in pair])
        return upper

    def _live_kv(self, cache: List[Any], lo: int, hi: int) -> List[KV]:
        return _slice_kv([cache[i].state[:2] for i in self._attn], lo, hi)

    def insert(
        self,
        tokens: Sequence[int],
        cache: List[Any],
        checkpoints: Dict[int, _Checkpoint],
        mtp_cache: Optional[List[Any]] = None,
    ) -> None:
        """Store ``tokens`` (all held by ``cache``, and ``mtp_cache`` slots 0..len-2 when given)
        with ``checkpoints`` {depth: _Checkpoint}; then evict down to the budget."""
        tokens = list(tokens)
        n = len(tokens)
        path, depth = self._walk(tokens, n, split=True)
        node = path[-1] if path else self._root  # where a new branch hangs: the walk ended on an edge end
        mtp_ok = mtp_cache is not None and mtp_cache[0].offset >= n - 1
        for p in path:  # a path stored by a run without the MTP head gets its MTP KV now
            if p.mtp is None and mtp_ok and p.end <= n and p.end > p.mtp_start:
                p.mtp = _slice_kv([c.state[:2] for c in mtp_cache], p.mtp_start - 1, p.end - 1)
                mx.eval(p.mtp)
                self._bytes += sum(k.nbytes + v.nbytes for k, v in p.mtp)
        if depth < n:
            mtp = None
            if mtp_ok:
                mtp = _slice_kv([c.state[:2] for c in mtp_cache], max(depth, 1) - 1, n - 1)
            leaf = _Node(tokens[depth:], depth, node, self._live_kv(cache, depth, n), mtp)
            mx.eval([a for pair in leaf.kv + (leaf.mtp or []) for a in pair])
            node.children[tokens[depth]] = leaf
            self._bytes += leaf.kv_bytes
            path.append(leaf)
        self._add_checkpoints(path, n, checkpoints)
        self._evict()

    def prefill_checkpoints(self, hit: _Hit, n: int, boundaries: Sequence[int] = ()) -> Dict[int, int]:
        """{depth: kind} where prefilling a prompt of ``n`` tokens from ``hit`` keeps a checkpoint:
        every ``checkpoint_interval``, at ``boundaries``, at the prompt's end (all but its last
        token), and where the prompt leaves the cached ones (the next may leave it there too:
        a changed line, another question after the same document)."""
        boundaries = [*boundaries, hit.match]
        return {
            d: END if d == n - 1 else BOUNDARY if d in boundaries else INTERVAL
            for d in self.checkpoint_depths(hit.depth, n - 1, boundaries)
        }

    def snapshot(self, cache: List[Any], kind: int) -> _Checkpoint:
        """A checkpoint of ``cache``'s DeltaNet states now, of ``kind`` (from ``prefill_checkpoints``)."""
        return self._checkpoint(cache, None, kind)

    def store(self, tokens: Sequence[int], cache: List[Any], checkpoints: Optional[Dict[int, _Checkpoint]] = None) -> None:
        """Store a finished sequence: ``tokens``, all held by ``cache`` (one sequence's caches,
        e.g. a ``BatchEngine`` request's returned with ``return_cache``), resumable at its end
        and at ``checkpoints`` {depth: ``snapshot``} taken on the way."""
        tokens = list(tokens)
        self.insert(tokens, cache, {**(checkpoints or {}), len(tokens): self._checkpoint(cache, None, END)})

    def _add_checkpoints(self, path: List[_Node], n: int, checkpoints: Dict[int, _Checkpoint]) -> None:
        now = self._tick()
        for node in path:
            for d, cp in node.checkpoints.items():
                if d <= n:
                    cp.used = now
            for d in [d for d in checkpoints if node.start < d <= node.end]:
                old = node.checkpoints.get(d)
                if old is None or (old.hidden is None and checkpoints[d].hidden is not None):
                    cp = checkpoints.pop(d)
                    cp.used = now
                    mx.eval([a for pair in cp.states for a in pair], cp.hidden)
                    node.checkpoints[d] = cp
                    self._bytes += cp.nbytes - (old.nbytes if old is not None else 0)

    def _evict(self) -> None:
        while self._bytes > self.max_bytes:
            node, d = min(
                ((n, d) for n in self._nodes() for d in n.checkpoints),
                key=lambda nd: (nd[0].checkpoints[nd[1]].used, nd[0].checkpoints[nd[1]].rank),
            )
            self._bytes -= node.checkpoints.pop(d).nbytes
            self._counts["evictions"] += 1
            self._prune(node)

    def _prune(self, node: _Node) -> None:
        """Drop ``node`` and the ancestors that have nothing left a lookup could resume from."""
        while node is not self._root and not node.children and not node.checkpoints:
            del node.parent.children[node.tokens[0]]
            self._bytes -= node.kv_bytes
            node = node.parent

    # ---- generation ----

    def _checkpoint(self, cache: List[Any], hidden: Optional[mx.array], rank: int) -> _Checkpoint:
        states = [tuple(cache[i].snapshot()) for i in self._delta]
        return _Checkpoint(states, _copy(hidden) if hidden is not None else None, rank=rank)

    def generate_tokens(
        self,
        prompt: mx.array,
        boundaries: Sequence[int] = (),
        *,
        mtp: bool = False,
        draft_tokens: int = 2,
        mtp_stats: Optional[Any] = None,
        **options: Any,
    ) -> Tuple[int, Iterator[Tuple[int, mx.array, bool]]]:
        """(prompt tokens reused, a stream of (token, logprobs, from_draft)) for ``prompt``:
        resumed from the cache, checkpointed as it goes, and stored back once the stream ends
        or is closed. ``options`` are ``generate_step``'s."""
        tokens = [int(t) for t in prompt.tolist()]
        hit = self.lookup(tokens, mtp=mtp)
        rest = prompt[hit.depth :]
        ranks = self.prefill_checkpoints(hit, len(tokens), boundaries)
        depths = sorted(ranks)
        taken: Dict[int, _Checkpoint] = {}
        keep_hidden = self._mtp and mtp

        def on_checkpoint(end: int, hidden: mx.array) -> None:
            d = hit.depth + end
            if d in ranks:
                taken[d] = self._checkpoint(hit.cache, hidden if keep_hidden else None, ranks[d])

        hooks = dict(
            checkpoints=[d - hit.depth for d in depths], on_checkpoint=on_checkpoint, context=prompt[: hit.depth]
        )
        if mtp:
            from .speculative import MtpState, mtp_generate_step

            state = MtpState(hit.cache, hit.mtp_cache, max(hit.depth - 1, 0), hit.hidden)
            stream = mtp_generate_step(
                rest, self.model, draft_tokens=draft_tokens, stats=mtp_stats, state=state, **hooks, **options
            )
        else:
            state = None
            stream = ((t, lp, False) for t, lp in generate_step(rest, self.model, cache=hit.cache, **hooks, **options))
        return hit.depth, self._store_after(tokens, hit, stream, taken, state)

    def _store_after(
        self,
        tokens: List[int],
        hit: _Hit,
        stream: Iterator[Tuple[int, mx.array, bool]],
        taken: Dict[int, _Checkpoint],
        state: Optional[Any],
    ) -> Iterator[Tuple[int, mx.array, bool]]:
        generated: List[int] = []
        consistent = False  # an error inside the stream leaves the caches in no known state
        try:
            for item in stream:
                generated.append(item[0])
                yield item
            consistent = True
        except GeneratorExit:
            consistent = True
            raise
        finally:
            stream.close()
            if consistent and generated:
                if state is None:  # the cache holds every yielded token
                    held = tokens + generated
                    taken[len(held)] = self._checkpoint(hit.cache, None, END)
                    self.insert(held, hit.cache, taken)
                else:  # the last yielded token is not in the caches yet
                    held = tokens + generated[:-1]
                    hidden = state.settle(self.model, held)
                    taken[len(held)] = self._checkpoint(hit.cache, hidden, END)
                    self.insert(held, hit.cache, taken, state.mtp_cache)

    # ---- files ----

    def save(self, path: Union[str, Path]) -> None:
        """Write the cache to a safetensors file (a temporary file renamed into place)."""
        path = Path(path)
        arrays: Dict[str, mx.array] = {}
        nodes: List[Dict[str, Any]] = []
        index: Dict[int, int] = {id(self._root): -1}
        order = [self._root]
        for node in order:  # parents before children
            order.extend(node.children.values())
        for node in order[1:]:
            i = index[id(node)] = len(nodes)
            arrays[f"{i}.tokens"] = mx.array(node.tokens, dtype=mx.int32)
            for j, (k, v) in enumerate(node.kv):
                arrays[f"{i}.kv.{j}.k"], arrays[f"{i}.kv.{j}.v"] = k, v
            for j, (k, v) in enumerate(node.mtp or []):
                arrays[f"{i}.mtp.{j}.k"], arrays[f"{i}.mtp.{j}.v"] = k, v
            for d, cp in node.checkpoints.items():
                for j, (conv, rec) in enumerate(cp.states):
                    arrays[f"{i}.cp.{d}.{j}.conv"], arrays[f"{i}.cp.{d}.{j}.rec"] = conv, rec
                if cp.hidden is not None:
                    arrays[f"{i}.cp.{d}.hidden"] = cp.hidden
            nodes.append(
                dict(
                    parent=index[id(node.parent)], start=node.start, mtp=node.mtp is not None,
                    checkpoints=[[d, cp.hidden is not None, cp.used, cp.rank] for d, cp in node.checkpoints.items()],
                )
            )
        metadata = dict(
            format=FORMAT,
            model=model_fingerprint(self.model),
            checkpoint_interval=str(self.checkpoint_interval),
            nodes=json.dumps(nodes),
        )
        tmp = path.with_name(path.name + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), arrays, metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, Path], model: Any, max_bytes: Optional[int] = None) -> "PromptCache":
        """A cache saved by ``save`` for this same model (config, quantization and weights)."""
        path = Path(path)
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise PromptCacheError(f"{path}: not a readable safetensors file ({e})") from None
        if metadata.get("format") != FORMAT:
            found = metadata.get("format")
            raise PromptCacheError(f"{path}: not a prompt cache file (format {found!r}, expected {FORMAT!r})")
        if metadata.get("model") != model_fingerprint(model):
            raise PromptCacheError(f"{path}: saved for another model, config or quantization than the one loaded")
        try:
            interval = int(metadata["checkpoint_interval"])
            nodes = json.loads(metadata["nodes"])
            pc = cls(model, max_bytes, interval)
            pc._restore(nodes, arrays)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise PromptCacheError(f"{path}: corrupt prompt cache file ({type(e).__name__}: {e})") from None
        pc._evict()
        return pc

    def _restore(self, nodes: List[Dict[str, Any]], arrays: Dict[str, mx.array]) -> None:
        template = self._expected_shapes()
        built: List[_Node] = []
        for i, spec in enumerate(nodes):
            tokens = [int(t) for t in arrays[f"{i}.tokens"].tolist()]
            parent = self._root if spec["parent"] == -1 else built[spec["parent"]]
            if not tokens or int(spec["start"]) != parent.end or tokens[0] in parent.children:
                raise ValueError(f"node {i} does not continue its parent")
            start, n = parent.end, len(tokens)

            def get(name: str, shape: Tuple[int, ...]) -> mx.array:
                a = arrays[name]
                if tuple(a.shape) != shape:
                    raise ValueError(f"tensor {name} has shape {tuple(a.shape)}, expected {shape}")
                return a

            def kv(prefix: str, layers: int, length: int) -> List[KV]:
                shape = template["kv"](length)
                return [(get(f"{prefix}.{j}.k", shape), get(f"{prefix}.{j}.v", shape)) for j in range(layers)]

            mtp = kv(f"{i}.mtp", template["mtp_layers"], start + n - max(start, 1)) if spec["mtp"] else None
            node = _Node(tokens, start, parent, kv(f"{i}.kv", len(self._attn), n), mtp)
            for d, has_hidden, used, rank in spec["checkpoints"]:
                if not start < int(d) <= start + n:
                    raise ValueError(f"node {i}: checkpoint depth {d} outside ({start}, {start + n}]")
                states = [
                    (get(f"{i}.cp.{d}.{j}.conv", template["conv"]), get(f"{i}.cp.{d}.{j}.rec", template["rec"]))
                    for j in range(len(self._delta))
                ]
                hidden = get(f"{i}.cp.{d}.hidden", template["hidden"]) if has_hidden else None
                node.checkpoints[int(d)] = _Checkpoint(states, hidden, int(used), int(rank))
                self._bytes += node.checkpoints[int(d)].nbytes
                self._clock = max(self._clock, int(used))
            parent.children[tokens[0]] = node
            self._bytes += node.kv_bytes
            built.append(node)

    def _expected_shapes(self) -> Dict[str, Any]:
        a = self.model.args
        conv_dim = 2 * a.linear_num_key_heads * a.linear_key_head_dim + a.linear_num_value_heads * a.linear_value_head_dim
        return dict(
            kv=lambda n: (1, a.num_key_value_heads, n, a.head_dim),
            conv=(1, a.linear_conv_kernel_dim - 1, conv_dim),
            rec=(1, a.linear_num_value_heads, a.linear_value_head_dim, a.linear_key_head_dim),
            hidden=(1, 1, a.hidden_size),
            mtp_layers=len(self.model.mtp.layers) if self._mtp else 0,
        )
