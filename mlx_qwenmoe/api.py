"""``load``: a model and its tokenizer from a directory, a Hugging Face repo, or the bundled
demo checkpoint; and rendering a conversation with the checkpoint's chat template."""

from __future__ import annotations

import bisect
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from jinja2 import TemplateError
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .errors import CheckpointError, ModelNotFoundError, QwenMoeError
from .loading import ShardHook, load_model, resolve_model_path
from .model import Model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def default_model_dir() -> Path:
    """Where the demo checkpoint shipped inside the package lives."""
    return Path(str(importlib.resources.files("mlx_qwenmoe.default_model")))


def resolve(path_or_repo: Optional[Union[str, Path]] = None) -> Path:
    """A local model directory: ``path_or_repo`` resolved, or the bundled default when None."""
    if path_or_repo is not None:
        return resolve_model_path(str(path_or_repo))
    model_dir = default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise ModelNotFoundError(
            f"no --model given and the bundled default model is not installed ({model_dir} has no config.json)"
        )
    return model_dir


def eos_token_ids(model_dir: Path, config: Dict[str, Any]) -> List[int]:
    """The checkpoint's end-of-sequence ids: generation_config.json's, else config.json's."""
    generation_config = Path(model_dir) / "generation_config.json"
    eos = None
    if generation_config.is_file():
        try:
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{generation_config}: not a JSON object") from None
    if eos is None:
        eos = config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def load(
    path_or_repo: Optional[Union[str, Path]] = None,
    *,
    dtype: Optional[mx.Dtype] = None,
    max_resident: Optional[Union[int, str]] = None,
    prefetch_experts: bool = False,
    parallel: Optional[str] = None,
) -> Tuple[Model, TokenizerWrapper]:
    """(model, tokenizer) from a local directory or a Hugging Face repo id (downloaded with
    ``huggingface_hub``, honouring ``HF_HUB_OFFLINE``); None loads the bundled demo model.

    ``max_resident`` (bytes, or a size such as "6GiB"): keep at most this much of the routed
    experts in memory and read the others from the checkpoint files as they are routed to
    (``expert_stream``); the model's ``expert_stream.stats`` counts hits and bytes read.
    ``prefetch_experts``: also read each next layer's predicted experts ahead of time.

    Under ``mlx.launch`` this process loads only its share: ``parallel`` is "expert" (the
    default), "pipeline" or "expert+pipeline" (see ``mlx_qwenmoe.distributed``); a process
    running alone ignores it."""
    from .distributed import world

    group = world()
    if group is None:
        return _load(path_or_repo, dtype, max_resident=max_resident, prefetch_experts=prefetch_experts)
    if max_resident is not None:
        raise ValueError("max_resident: expert streaming does not run under mlx.launch (each rank holds its own experts)")
    from .distributed import load_parallel

    return load_parallel(lambda shard: _load(path_or_repo, dtype, shard=shard), parallel, group)


def _load(
    path_or_repo: Optional[Union[str, Path]],
    dtype: Optional[mx.Dtype],
    *,
    shard: Optional[ShardHook] = None,
    max_resident: Optional[Union[int, str]] = None,
    prefetch_experts: bool = False,
) -> Tuple[Model, TokenizerWrapper]:
    model_dir = resolve(path_or_repo)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer ({', '.join(TOKENIZER_FILES)})")
    if max_resident is None:
        model, config = load_model(model_dir, dtype=dtype, shard=shard)
    else:
        from .convert.memory import parse_size
        from .expert_stream import stream_experts

        model, config = load_model(model_dir, dtype=dtype, lazy=True)
        budget = max_resident if isinstance(max_resident, int) else parse_size(max_resident, "max_resident")
        stream_experts(model, model_dir, budget, prefetch=prefetch_experts)
        mx.eval(model.parameters())
    tokenizer = _load_tokenizer(model_dir, config)
    size = len(tokenizer._tokenizer)
    if size > model.args.vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has {size} tokens but the model's vocab_size is {model.args.vocab_size}"
        )
    return model, tokenizer


def _load_tokenizer(model_dir: Path, config: Dict[str, Any]) -> TokenizerWrapper:
    try:
        return load_tokenizer(model_dir, eos_token_ids=eos_token_ids(model_dir, config))
    except QwenMoeError:
        raise
    except Exception as e:  # noqa: BLE001  transformers and tokenizers raise many types for bad files
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{model_dir}: the tokenizer cannot be loaded ({detail})") from None


def _render(
    tokenizer: TokenizerWrapper,
    messages: Sequence[Dict[str, Any]],
    add_generation_prompt: bool,
    enable_thinking: Optional[bool],
    tools: Optional[List[Dict[str, Any]]],
    template_kwargs: Dict[str, Any],
) -> str:
    if not tokenizer.has_chat_template:
        raise ValueError("this checkpoint's tokenizer has no chat template")
    kwargs = dict(template_kwargs)
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    if tools is not None:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )


def chat_prompt(
    tokenizer: TokenizerWrapper,
    messages: Sequence[Dict[str, str]],
    *,
    enable_thinking: Optional[bool] = None,
) -> List[int]:
    """Token ids of ``messages`` rendered with the chat template, ending with the assistant's
    turn opened. ``enable_thinking`` (Qwen3.5's thinking switch) None: mlx-lm's default,
    on when the vocabulary has think tags."""
    try:
        text = _render(tokenizer, messages, True, enable_thinking, None, {})
    except TemplateError as e:
        raise CheckpointError(f"the checkpoint's chat template fails ({type(e).__name__}: {e})".splitlines()[0]) from None
    return tokenizer.encode(text, add_special_tokens=False)


def chat_prompt_with_boundaries(
    tokenizer: TokenizerWrapper,
    messages: Sequence[Dict[str, Any]],
    enable_thinking: Optional[bool] = None,
    tools: Optional[List[Dict[str, Any]]] = None,
    **template_kwargs: Any,
) -> Tuple[List[int], List[int]]:
    """``chat_prompt``'s ids (with ``tools`` and any other template variables), and the token
    offsets where each message and each message's content begins, the assistant's new turn
    included: a prompt cache keeps a checkpoint there, so a template that renders an earlier
    turn differently next time (Qwen3.5 drops old thinking) still reuses everything before it.

    An offset is where a render of the conversation cut there stops agreeing with the whole
    render (its text is usually a prefix; when a template renders a conversation's end
    differently it is not, and the agreeing part is used), rounded down to a token edge.
    """
    text = _render(tokenizer, messages, True, enable_thinking, tools, template_kwargs)
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in encoded["offset_mapping"]]
    # Each message's start, and its content's start (the message rendered empty): a re-rendered
    # turn keeps its header, and the assistant's new turn starts after its header too.
    cuts = [list(messages[:k]) for k in range(1, len(messages) + 1)]
    cuts += [list(messages[:k]) + [dict(m, content="")] for k, m in enumerate(messages)]
    cuts.append(list(messages) + [{"role": "assistant", "content": ""}])
    boundaries = set()
    for cut in cuts:
        try:
            prefix = _render(tokenizer, cut, False, enable_thinking, tools, template_kwargs)
        except TemplateError:  # a template may refuse a conversation cut there (e.g. ending with a tool call)
            continue
        boundaries.add(bisect.bisect_right(ends, len(os.path.commonprefix([prefix, text]))))
    return list(encoded["input_ids"]), sorted(boundaries - {0, len(ends)})
