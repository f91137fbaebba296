"""Splits a chat model's streamed text into reasoning, content and tool calls.

Qwen3.5 thinks inside ``<think>...</think>`` (its chat template usually opens the block in
the prompt, so the output starts inside it) and calls tools with XML blocks:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

The parser is fed text as it is generated and never lets a tag, or the first characters
of one, reach ``content``. A tool-call block is held until it closes, then parsed with
mlx-lm's parser for the checkpoint (``mlx_lm.tool_parsers.qwen3_coder`` for Qwen3.5); a
block that does not parse is given back as content, unchanged.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from mlx_lm.tool_parsers import qwen3_coder

ToolParse = Callable[[str, Optional[Sequence[Dict[str, Any]]]], Dict[str, Any]]

REASONING = "reasoning"
CONTENT = "content"
_TOOL = "tool"


@dataclass
class TextDelta:
    """A piece of ``reasoning`` or ``content`` text."""

    kind: str
    text: str


@dataclass
class ToolCall:
    """One parsed call, in OpenAI's shape (``arguments`` is a JSON string)."""

    index: int
    id: str
    name: str
    arguments: str

    def to_openai(self) -> Dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Event = Union[TextDelta, ToolCall]


@dataclass(frozen=True)
class ToolFormat:
    """How a checkpoint writes tool calls: the block's tags and the parser of its inside."""

    start: str
    end: str
    parse: ToolParse


def tool_format(tokenizer: Any) -> ToolFormat:
    """The format mlx-lm inferred from the checkpoint's chat template, else Qwen3.5's XML."""
    if getattr(tokenizer, "has_tool_calling", False):
        return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser)
    return ToolFormat(qwen3_coder.tool_call_start, qwen3_coder.tool_call_end, qwen3_coder.parse_tool_call)


def think_tags(tokenizer: Any) -> Optional[Tuple[str, str]]:
    """(start, end) thinking tags of the vocabulary, or None if it has none."""
    return (tokenizer.think_start, tokenizer.think_end) if getattr(tokenizer, "has_thinking", False) else None


def prompt_opens_thinking(tokenizer: Any, prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends inside a thinking block (Qwen3.5's template opens one)."""
    tags = think_tags(tokenizer)
    if tags is None:
        return False
    tail = tokenizer.decode(list(prompt_ids[-16:]))
    return tail.rfind(tags[0]) > tail.rfind(tags[1])


def _held_back(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a marker."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


class OutputParser:
    """Feed it text pieces; it returns the events that are certain so far."""

    def __init__(
        self,
        *,
        think: Optional[Tuple[str, str]] = None,
        thinking: bool = False,
        tools: Optional[ToolFormat] = None,
        tool_specs: Optional[Sequence[Dict[str, Any]]] = None,
    ):
        if thinking and think is None:
            raise ValueError("thinking=True needs the think tags")
        self.think = think
        self.tools = tools
        self.tool_specs = tool_specs
        self.state = REASONING if thinking else CONTENT
        self.pending = ""
        self.calls = 0
        # Drop the newlines the template puts after </think> and between tool calls.
        self.skip_newlines = False

    def _markers(self) -> List[str]:
        if self.state == REASONING:
            return [self.think[1]]
        if self.state == _TOOL:
            return [self.tools.end]
        return [m for m in ((self.think[0] if self.think else None), (self.tools.start if self.tools else None)) if m]

    def feed(self, text: str) -> List[Event]:
        self.pending += text
        events: List[Event] = []
        while True:
            markers = self._markers()
            hits = [(i, m) for i, m in ((self.pending.find(m), m) for m in markers) if i >= 0]
            if not hits:
                break
            i, marker = min(hits)
            before, self.pending = self.pending[:i], self.pending[i + len(marker) :]
            self._switch(before, marker, events)
        if self.state != _TOOL:
            cut = len(self.pending) - _held_back(self.pending, self._markers())
            self._emit(self.state, self.pending[:cut], events)
            self.pending = self.pending[cut:]
        return events

    def finish(self) -> List[Event]:
        """Whatever is still held: a partial tag is text, an unclosed tool block is parsed if it can be."""
        events: List[Event] = []
        rest, self.pending = self.pending, ""
        if self.state == _TOOL:
            self._close_tool(rest, closed=False, events=events)
        else:
            self._emit(self.state, rest, events)
        return events

    def _switch(self, before: str, marker: str, events: List[Event]) -> None:
        if self.state == _TOOL:
            self._close_tool(before, closed=True, events=events)
            self.state = CONTENT
            return
        self._emit(self.state, before, events)
        if self.state == REASONING:
            self.state, self.skip_newlines = CONTENT, True
        elif self.think and marker == self.think[0]:
            self.state = REASONING
        else:
            self.state = _TOOL

    def _close_tool(self, block: str, *, closed: bool, events: List[Event]) -> None:
        try:
            call = self.tools.parse(block.strip(), self.tool_specs)
            call = ToolCall(
                index=self.calls,
                id=f"call_{uuid.uuid4().hex[:24]}",
                name=str(call["name"]),
                arguments=json.dumps(call["arguments"], ensure_ascii=False),
            )
        except (ValueError, SyntaxError, TypeError, KeyError, OverflowError):
            text = self.tools.start + block + (self.tools.end if closed else "")
            self._emit(CONTENT, text, events)
            return
        self.calls += 1
        self.skip_newlines = True
        events.append(call)

    def _emit(self, kind: str, text: str, events: List[Event]) -> None:
        if kind == CONTENT and self.skip_newlines:
            text = text.lstrip("\n")
            if not text:
                return
            self.skip_newlines = False
        if not text:
            return
        if events and isinstance(events[-1], TextDelta) and events[-1].kind == kind:
            events[-1].text += text
        else:
            events.append(TextDelta(kind, text))
