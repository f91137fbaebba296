"""A chat request's messages and tools rendered with the checkpoint's chat template."""

from __future__ import annotations

import inspect
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jinja2 import TemplateError

from ..api import chat_prompt_with_boundaries
from .http_errors import APIError
from .schemas import ChatCompletionRequest, Message


def _text(message: Message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


def _arguments(arguments: Any, where: str) -> Dict[str, Any]:
    """A tool call's arguments as the template iterates them: a mapping, not OpenAI's JSON string."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            raise APIError(f"'{where}': not valid JSON ({e})", param=where) from None
    if not isinstance(arguments, dict):
        raise APIError(f"'{where}': must be a JSON object", param=where)
    return arguments


def template_messages(messages: Sequence[Message]) -> List[Dict[str, Any]]:
    """OpenAI messages as Qwen3.5's template reads them (``developer`` is ``system``; tool-call
    arguments as mappings; ``reasoning_content`` kept for the template to place)."""
    out = []
    for i, m in enumerate(messages):
        d: Dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text(m)}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments, f"messages.{i}.tool_calls.{j}.function.arguments"),
                    },
                }
                for j, c in enumerate(m.tool_calls)
            ]
        out.append(d)
    return out


def _template_variables(tokenizer: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``chat_template_kwargs`` as variables for the template only: none may set a parameter of
    ``apply_chat_template`` itself (another template, tokenizer options, return types)."""
    hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    params = inspect.signature(type(hf_tokenizer).apply_chat_template).parameters
    reserved = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for name in sorted(kwargs):
        if name in reserved or not name.isidentifier():
            raise APIError(f"'chat_template_kwargs.{name}': not a template variable the server passes on",
                           param="chat_template_kwargs")
    return kwargs


def render_chat(
    tokenizer: Any, request: ChatCompletionRequest, tools: Optional[List[Dict[str, Any]]]
) -> Tuple[List[int], List[int]]:
    """Token ids of the conversation, ending with the assistant's turn opened, and the offsets
    where its messages begin (the prompt cache keeps checkpoints there)."""
    if not tokenizer.has_chat_template:
        raise APIError("this model has no chat template: use /v1/completions", param="messages")
    kwargs = _template_variables(tokenizer, dict(request.chat_template_kwargs or {}))
    try:
        return chat_prompt_with_boundaries(tokenizer, template_messages(request.messages), tools=tools, **kwargs)
    except TemplateError as e:
        raise APIError(f"the chat template rejected the messages: {e}", param="messages") from None
