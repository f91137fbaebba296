"""Response bodies and stream chunks in OpenAI's shapes (chat completions and legacy completions)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .backend import TokenLogprob, Usage
from .stream_parser import CONTENT, REASONING, Event, TextDelta, ToolCall


@dataclass
class Envelope:
    """What every body and chunk of one response repeats."""

    object: str
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, object: str, model: str, prefix: str) -> "Envelope":
        return cls(object, model, f"{prefix}-{uuid.uuid4().hex[:24]}")

    def wrap(self, choices: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices, **extra}


def sse(payload: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage_dict(usage: Usage) -> Dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _entry(token: str, logprob: float) -> Dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> Dict[str, Any]:
    """Chat's ``logprobs``: one entry per generated token, with its top alternatives."""
    return {
        "content": [
            {**_entry(e.token, e.logprob), "top_logprobs": [_entry(t, lp) for t, lp in e.top]} for e in entries
        ]
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> Dict[str, Any]:
    """Legacy completions' ``logprobs``: parallel lists, text offsets counted from ``offset``."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def delta(event: Event) -> Dict[str, Any]:
    """A parser event as a chat stream delta."""
    if isinstance(event, ToolCall):
        return {"tool_calls": [{"index": event.index, **event.to_openai()}]}
    return {"reasoning_content" if event.kind == REASONING else "content": event.text}


def finish_reason(reason: str, tool_calls: int) -> str:
    """OpenAI reports a turn that ended in tool calls as "tool_calls"."""
    return "tool_calls" if tool_calls and reason == "stop" else reason


def chat_message(events: Sequence[Event]) -> Dict[str, Any]:
    """The assistant message of a whole (non-streamed) chat completion."""
    content = "".join(e.text for e in events if isinstance(e, TextDelta) and e.kind == CONTENT)
    reasoning = "".join(e.text for e in events if isinstance(e, TextDelta) and e.kind == REASONING)
    calls = [e.to_openai() for e in events if isinstance(e, ToolCall)]
    message: Dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def chat_chunk(env: Envelope, delta: Dict[str, Any], *, finish: Optional[str] = None,
               logprobs: Optional[Dict[str, Any]] = None, with_usage: bool = False) -> Dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return env.wrap([choice], **({"usage": None} if with_usage else {}))


def completion_chunk(env: Envelope, text: str, *, finish: Optional[str] = None,
                     logprobs: Optional[Dict[str, Any]] = None, with_usage: bool = False) -> Dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return env.wrap([choice], **({"usage": None} if with_usage else {}))
