"""``mlx_qwenmoe serve``: the real server process on the bundled model, driven with the
official ``openai`` client (and raw HTTP where a client would refuse to send the request)."""

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from qwen_chat_model import load_qwen_chat_tokenizer, make_qwen_chat_model_dir

MODEL = "default_model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: bytes):
    """(status, JSON body) of a raw POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _start(log_path: Path, *args: str):
    """A server process on a free port: (process, base URL, log path, log file)."""
    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_qwenmoe", "serve", "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, f"http://127.0.0.1:{port}", log_path, log


def _wait_up(proc, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            _get(base + "/health")
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log_path.read_text()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started together: the bundled model as shipped (no --model), and the same
    weights with a chat template that renders tools and thinking as Qwen3.5's does, decoding
    with MTP (greedy MTP output is plain greedy output, so the tests' expectations hold)."""
    qwen_dir = make_qwen_chat_model_dir(tmp_path_factory.mktemp("qwen") / "model")
    logs = tmp_path_factory.mktemp("serve")
    started = [_start(logs / "default.log"), _start(logs / "qwen.log", "--model", str(qwen_dir), "--mtp"),
               _start(logs / "small.log", "--max-batch", "1", "--max-queue", "1", "--max-resident", "1MB")]
    try:
        for proc, base, log_path, _ in started:
            _wait_up(proc, base, log_path)
        yield {"default": started[0][1:3], "qwen": (started[1][1], str(qwen_dir), started[1][2]),
               "small": started[2][1:3]}
    finally:
        for proc, _, _, log in started:
            proc.terminate()
        for proc, _, _, log in started:
            proc.wait(timeout=30)
            log.close()


@pytest.fixture(scope="module")
def server(servers):
    return servers["default"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, content="def add(a, b):", **kwargs):
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = _get(server[0] + "/health")
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_non_streaming_and_streaming_agree(client):
    whole = _chat(client)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 0
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_logprobs_and_stop(client):
    r = _chat(client, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 8 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)  # greedy: the top token
    full = r.choices[0].message.content
    stop = full[len(full) // 2 :][:3]
    cut = _chat(client, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.message.content and full.startswith(cut.message.content)


def test_seed_makes_sampling_repeatable(client):
    runs = [_chat(client, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=6, temperature=0, logprobs=2)
    assert r.choices[0].text and r.usage.completion_tokens == 6
    assert len(r.choices[0].logprobs.tokens) == 6
    streamed = list(client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.prompt_tokens == r.usage.prompt_tokens
    ids = client.completions.create(model=MODEL, prompt=[100, 200, 300], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


LONG = "x = 1\n" * 3000  # about 6000 tokens: past the demo model's 4096-token context
BAD = {
    "malformed JSON": (b'{"model": "default_model", "messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "missing messages": (json.dumps({"model": MODEL}).encode(), 400, "messages"),
    "messages of the wrong type": ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    "unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    "max_tokens a string": ({"max_tokens": "ten"}, 400, "max_tokens"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "max_tokens"),
    "temperature out of range": ({"temperature": 3}, 400, "temperature"),
    "stream not a bool": ({"stream": "yes"}, 400, "stream"),
    "top_logprobs too many": ({"logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    "n 2": ({"n": 2}, 400, "n"),
    "json response_format": ({"response_format": {"type": "json_object"}}, 400, "response_format.type"),
    "tool arguments not JSON": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
        "messages.1.tool_calls.0.function.arguments"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    "prompt + max_tokens past the context": ({"max_tokens": 4090}, 400, "messages"),
    "unknown model": ({"model": "../../etc/passwd"}, 404, "model"),
    "another chat template": ({"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}, 400, "chat_template_kwargs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_then_a_good_one(server, client, case):
    body, status, param = BAD[case]
    if isinstance(body, dict):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}).encode()
    code, reply = _post(server[0] + "/v1/chat/completions", body)
    assert code == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if "context" in case:
        assert error["code"] == "context_length_exceeded"
        assert "4096" in error["message"] and re.search(r"has \d+ tokens", error["message"])
    assert _chat(client, max_tokens=2).choices[0].message.content is not None


def test_bad_completion_requests(server, client):
    for body, param in [({"prompt": [5, 10**6]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": 5}, "prompt")]:
        code, reply = _post(server[0] + "/v1/completions", json.dumps({"model": MODEL, **body}).encode())
        assert code == 400 and reply["error"]["param"] == param, reply
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_unknown_fields_are_ignored(client):
    r = _chat(client, max_tokens=2, extra_body={"some_new_field": {"x": 1}, "user": "me"})
    assert r.usage.completion_tokens == 2


def test_concurrent_requests_are_queued(server, client):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda n: _chat(client, max_tokens=n), [6, 5, 4]))
    assert [r.usage.completion_tokens for r in results] == [6, 5, 4]
    assert len({r.id for r in results}) == 3


def _wait_idle(base):
    deadline = time.monotonic() + 30
    while (h := _get(base + "/health"))["active_requests"] or h["queued_requests"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    return h


def test_client_disconnect_stops_generation(server, client):
    base, log_path = server
    _chat(client, max_tokens=4)
    idle = _wait_idle(base)
    baseline = idle["memory_after_last_request_bytes"] - idle["prompt_cache_bytes"]
    stream = _chat(client, content="class Parser:", max_tokens=3000, stream=True)
    first = next(iter(stream))
    stream.close()
    idle = _wait_idle(base)
    line = next(ln for ln in log_path.read_text().splitlines() if first.id in ln)
    generated = int(re.search(r"(\d+) tokens, (cancelled|finish)", line).group(1))
    assert "cancelled" in line and generated < 3000, line
    # What the request computed stays in the prompt cache, within its budget; outside it, less
    # than 256 KiB (MLX's own buffers, e.g. for a new prompt length) may stay.
    assert idle["memory_after_last_request_bytes"] - idle["prompt_cache_bytes"] <= baseline + 256 * 1024
    assert _chat(client, max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_without_streaming(server, client):
    base, log_path = server
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"model": MODEL, "prompt": "class Parser:", "max_tokens": 3000, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not _get(base + "/health")["active_requests"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    _wait_idle(base)
    assert re.search(r"(?<!chat)cmpl-\w+: prompt \d+ tokens.* (\d+) tokens, cancelled", log_path.read_text())
    assert _chat(client, max_tokens=2).usage.completion_tokens == 2


# The same weights with a chat template that renders tools and thinking as Qwen3.5's does.

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def qwen_server(servers):
    base, model_dir, log_path = servers["qwen"]
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    return client, model_dir, load_qwen_chat_tokenizer(Path(model_dir)), log_path


def test_reasoning_content_is_separated(qwen_server):
    client, model, tokenizer, log_path = qwen_server
    messages = [{"role": "user", "content": "def add(a, b):"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # What the model writes after the template's opening <think>, raw.
    raw = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    thinking, _, answer = raw.partition("</think>")
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    message = r.choices[0].message
    assert message.reasoning_content == thinking and (message.content or "") == answer.lstrip("\n")
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == answer.lstrip("\n")
    assert re.search(r"finish \w+, MTP acceptance \d", log_path.read_text())  # --mtp decoded these
    off = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content and getattr(off.choices[0].message, "reasoning_content", None) is None


def test_tools_tool_results_and_reasoning_are_rendered(qwen_server):
    client, model, tokenizer, _ = qwen_server
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=model, messages=messages, tools=WEATHER, max_tokens=1, temperature=0)
    as_template_sees_them = [*messages[:1], {**messages[1], "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        messages[2]]
    expected = tokenizer.apply_chat_template(as_template_sees_them, tools=WEATHER, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(expected)
    none = client.chat.completions.create(model=model, messages=messages[:1], tools=WEATHER, tool_choice="none",
                                          max_tokens=1, temperature=0)
    assert none.usage.prompt_tokens == len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=messages[:1], tools=WEATHER, tool_choice="required", max_tokens=1)


def test_second_turn_reuses_the_prompt_cache(server, client):
    """Turn 2 resumes from turn 1's cached prefix and decodes what a cold run decodes."""
    from mlx_qwenmoe.api import chat_prompt, load
    from mlx_qwenmoe.generate import generate

    first = [{"role": "system", "content": "You complete Python code."}, {"role": "user", "content": "def mean(xs):"}]
    answer = client.chat.completions.create(model=MODEL, messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "def median(xs):"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=second, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    line = next(ln for ln in server[1].read_text().splitlines() if chunks[0].id in ln)
    assert f"cached {usage.prompt_tokens_details.cached_tokens}," in line, line
    model, tokenizer = load()
    cold = generate(model, tokenizer, chat_prompt(tokenizer, second), max_tokens=8)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cold


def test_concurrent_streams_decode_as_they_would_alone(client):
    """8 streaming clients at once (one batch) each get the text they get alone (greedy)."""
    prompts = [f"def f{i}(x):" + " x" * i for i in range(8)]

    def stream(prompt):
        chunks = _chat(client, content=prompt, max_tokens=12, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, prompts))
    alone = [stream(p) for p in prompts]
    assert together == alone and all(together)


def test_full_queue_answers_503_and_the_server_keeps_serving(servers, client):
    """--max-batch 1 --max-queue 1: a third request while two are held gets 503 with Retry-After.
    That server also streams its experts (--max-resident 1MB, a quarter of them): same greedy text."""
    base, _ = servers["small"]
    small = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    held = [_chat(small, content="class Parser:", max_tokens=3000, stream=True) for _ in range(2)]
    next(iter(held[0]))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert json.loads(refused.value.read())["error"]["code"] == "server_busy"
    for stream in held:
        stream.close()
    _wait_idle(base)
    assert _chat(small, max_tokens=6).choices[0].message.content == _chat(client, max_tokens=6).choices[0].message.content
