"""The server's thinking / tool-call stream parser, on text rendered by a chat template that
writes tool calls the way Qwen3.5's does: what the template writes for an assistant turn
must parse back into the same reasoning, content and calls, however the text is split."""

import asyncio
import json

import pytest

from mlx_qwenmoe.server.app import _chat_chunks
from mlx_qwenmoe.server.backend import Step, Usage
from mlx_qwenmoe.server.openai_format import Envelope

from mlx_qwenmoe.server.stream_parser import (
    CONTENT,
    REASONING,
    OutputParser,
    TextDelta,
    ToolCall,
    prompt_opens_thinking,
    think_tags,
    tool_format,
)
from qwen_chat_model import load_qwen_chat_tokenizer, make_qwen_chat_model_dir

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "filters": {"type": "object"},
                    "limit": {"type": "integer"},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]
USER = [{"role": "user", "content": "Find it."}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_qwen_chat_tokenizer(make_qwen_chat_model_dir(tmp_path_factory.mktemp("qwen") / "model"))


def _model_output(tokenizer, assistant):
    """What the model writes for ``assistant``: its rendered turn after the generation prompt."""
    prompt = tokenizer.apply_chat_template(USER, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(USER + [assistant], tools=TOOLS, tokenize=False)
    assert full.startswith(prompt) and full.endswith("<|im_end|>\n")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return full[len(prompt) : -len("<|im_end|>\n")], prompt_opens_thinking(tokenizer, ids)


def _parser(tokenizer, thinking=True):
    return OutputParser(think=think_tags(tokenizer), thinking=thinking, tools=tool_format(tokenizer), tool_specs=TOOLS)


def _parse(tokenizer, pieces, thinking=True):
    parser = _parser(tokenizer, thinking)
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, TextDelta) and e.kind == REASONING)
    content = "".join(e.text for e in events if isinstance(e, TextDelta) and e.kind == CONTENT)
    calls = [(e.name, json.loads(e.arguments)) for e in events if isinstance(e, ToolCall)]
    return reasoning, content, calls, events


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


NESTED = {
    "query": 'say "hi"\nthen {leave}',
    "filters": {"lang": ["py", "c"], "meta": {"quote": 'a "b" \'c\'', "n": 3, "deep": [{"x": None}]}},
    "limit": 5,
}
CASES = {
    "single": dict(content="", calls=[_call("search", {"query": "mlx"})]),
    "parallel": dict(content="Two lookups.", calls=[_call("search", {"query": "a", "limit": 2}), _call("now", {})]),
    "nested json, quotes, newlines": dict(content="", calls=[_call("search", NESTED)]),
    "no call": dict(content="Just text with <b>tags</b> and a < sign.", calls=[]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_turn_parses_back(tokenizer, case):
    spec = CASES[case]
    assistant = {"role": "assistant", "content": spec["content"], "reasoning_content": "Think about <it>.", "tool_calls": spec["calls"]}
    text, thinking = _model_output(tokenizer, assistant)
    assert thinking  # the template opened <think> in the prompt
    reasoning, content, calls, events = _parse(tokenizer, [text])
    assert reasoning.strip() == "Think about <it>."
    assert content.strip() == spec["content"]
    assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in spec["calls"]]
    ids = [e.id for e in events if isinstance(e, ToolCall)]
    assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)
    assert [e.index for e in events if isinstance(e, ToolCall)] == list(range(len(spec["calls"])))


@pytest.mark.parametrize("case", ["parallel", "nested json, quotes, newlines", "no call"])
def test_split_at_every_character(tokenizer, case):
    spec = CASES[case]
    assistant = {"role": "assistant", "content": spec["content"], "reasoning_content": "Hmm.", "tool_calls": spec["calls"]}
    text, _ = _model_output(tokenizer, assistant)
    whole = _parse(tokenizer, [text])[:3]
    for i in range(len(text) + 1):
        assert _parse(tokenizer, [text[:i], text[i:]])[:3] == whole, f"split at {i}: {text[:i]!r}"
    reasoning, content, calls, events = _parse(tokenizer, list(text))
    assert (reasoning, content, calls) == whole
    # Character by character, no content delta ever shows a piece of a tag.
    for e in events:
        if isinstance(e, TextDelta) and e.kind == CONTENT and spec["calls"]:
            assert "<" not in e.text and "tool_call" not in e.text


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\n<function=search>\n<parameter=query>\nx\n</parameter>\n</tool_call>",  # no </function>
        "<tool_call>\nsearch(query='x')\n</tool_call>",  # not the XML format
        "<tool_call>\n<function=search>\n<parameter=limit>\nmany\n</parameter>\n</function>\n</tool_call>",  # int expected
    ],
)
def test_malformed_block_stays_text(tokenizer, block):
    text = "Before. " + block + " After."
    for pieces in ([text], list(text)):
        reasoning, content, calls, _ = _parse(tokenizer, pieces, thinking=False)
        assert (reasoning, content, calls) == ("", text, [])


def test_unclosed_block_at_the_end_is_kept(tokenizer):
    text = "<tool_call>\n<function=search>\n<parameter=query>\nunfinished"
    assert _parse(tokenizer, list(text), thinking=False)[:3] == ("", text, [])


def test_thinking_opened_by_the_model_and_partial_tags_at_the_end(tokenizer):
    reasoning, content, calls, _ = _parse(tokenizer, list("<think>\nplan\n</think>\n\nanswer </thi"), thinking=False)
    assert (reasoning, content, calls) == ("\nplan\n", "answer </thi", [])


def test_thinking_switched_off_in_the_prompt(tokenizer):
    ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True, enable_thinking=False)
    assert not prompt_opens_thinking(tokenizer, ids)
    ids = tokenizer.apply_chat_template(USER, add_generation_prompt=True)
    assert prompt_opens_thinking(tokenizer, ids)


def test_without_tools_a_tool_block_is_content(tokenizer):
    text = "<tool_call>\n<function=now>\n</function>\n</tool_call>"
    parser = OutputParser(think=think_tags(tokenizer), thinking=False, tools=None)
    events = parser.feed(text) + parser.finish()
    assert events == [TextDelta(CONTENT, text)]


def test_streamed_chunks_of_parallel_tool_calls(tokenizer):
    """The SSE chunks the chat endpoint sends for a turn that ends in two tool calls, fed one
    character per generation step."""
    calls = [_call("search", {"query": "a", "filters": {"x": [1]}}), _call("now", {})]
    text, _ = _model_output(tokenizer, {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": calls})
    steps = [Step(text=c, token=0) for c in text] + [Step("", 0, finish_reason="stop", usage=Usage(5, len(text) + 1, 0))]

    async def replay():
        for step in steps:
            yield step

    async def collect():
        env = Envelope.new("chat.completion.chunk", "m", "chatcmpl")
        return [chunk async for chunk in _chat_chunks(replay(), _parser(tokenizer), env, True)]

    chunks = [json.loads(c[len("data: "):]) for c in asyncio.run(collect())]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == "r"
    assert not "".join(d.get("content") or "" for d in deltas)
    streamed = [t for d in deltas for t in d.get("tool_calls", [])]
    assert [(t["index"], t["type"], t["function"]["name"], json.loads(t["function"]["arguments"])) for t in streamed] == [
        (i, "function", c["function"]["name"], c["function"]["arguments"]) for i, c in enumerate(calls)
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(text) + 1
