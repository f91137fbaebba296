"""``load``: a model and its tokenizer from a directory, a Hugging Face repo, or the bundled
demo checkpoint; and rendering a conversation with the checkpoint's chat template."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .errors import CheckpointError, ModelNotFoundError
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
    parallel: Optional[str] = None,
) -> Tuple[Model, TokenizerWrapper]:
    """(model, tokenizer) from a local directory or a Hugging Face repo id (downloaded with
    ``huggingface_hub``, honouring ``HF_HUB_OFFLINE``); None loads the bundled demo model.

    Under ``mlx.launch`` this process loads only its share: ``parallel`` is "expert" (the
    default), "pipeline" or "expert+pipeline" (see ``mlx_qwenmoe.distributed``); a process
    running alone ignores it."""
    from .distributed import world

    group = world()
    if group is None:
        return _load(path_or_repo, dtype)
    from .distributed import load_parallel

    return load_parallel(lambda shard: _load(path_or_repo, dtype, shard), parallel, group)


def _load(path_or_repo: Optional[Union[str, Path]], dtype: Optional[mx.Dtype], shard: Optional[ShardHook] = None):
    model_dir = resolve(path_or_repo)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir}: no tokenizer ({', '.join(TOKENIZER_FILES)})")
    model, config = load_model(model_dir, dtype=dtype, shard=shard)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=eos_token_ids(model_dir, config))
    return model, tokenizer


def chat_prompt(
    tokenizer: TokenizerWrapper,
    messages: Sequence[Dict[str, str]],
    *,
    enable_thinking: Optional[bool] = None,
) -> List[int]:
    """Token ids of ``messages`` rendered with the chat template, ending with the assistant's
    turn opened. ``enable_thinking`` (Qwen3.5's thinking switch) None: mlx-lm's default,
    on when the vocabulary has think tags."""
    if not tokenizer.has_chat_template:
        raise ValueError("this checkpoint's tokenizer has no chat template")
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)
