"""The OpenAI-compatible HTTP app: /v1/chat/completions, /v1/completions, /v1/models, /health.

Requests are checked and tokenized here, then queued for the generation worker (batched,
or serial with MTP);
endpoints stream its steps back (server-sent events when ``stream`` is set). Nothing a
request sends can name a file or another model: the app only knows the model it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from ..generate import prompt_token_ids
from . import openai_format as fmt
from .backend import Backend, GenerationJob, SamplingParams, Step
from .http_errors import APIError, install_error_handlers
from .prompt import render_chat
from .schemas import ChatCompletionRequest, CompletionRequest, Sampling
from .stream_parser import OutputParser, prompt_opens_thinking, think_tags, tool_format
from .batch_worker import BatchWorker
from .worker import JobHandle, QueueFull, Worker


@dataclass
class ServerConfig:
    model_id: str
    context_length: int
    vocab_size: int
    sampling_defaults: Dict[str, Any] = field(default_factory=dict)
    max_batch: int = 8  # requests decoding together (1 with MTP: its speculative path is serial)
    max_queue: int = 32  # requests waiting beyond those; more get 503


class _Server:
    def __init__(self, backend: Backend, config: ServerConfig):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.config = config
        if backend.mtp:
            self.worker = Worker(backend, capacity=1 + config.max_queue)
        else:
            self.worker = BatchWorker(backend, max_batch=config.max_batch, max_queue=config.max_queue)

    def submit(self, job: GenerationJob) -> JobHandle:
        try:
            return self.worker.submit(job)
        except QueueFull as e:
            raise APIError(f"{e}; retry later", status=503, type="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None

    def check_model(self, body: Sampling) -> None:
        if body.model != self.config.model_id:
            raise APIError(
                f"model '{body.model}' is not served here; this server serves '{self.config.model_id}'",
                status=404, type="not_found_error", param="model", code="model_not_found",
            )

    def job(self, request_id: str, body: Sampling, prompt_ids: List[int], max_tokens: Optional[int],
            top_logprobs: Optional[int], boundaries: Sequence[int] = ()) -> GenerationJob:
        if body.n != 1:
            raise APIError(f"'n': only 1 choice per request is supported, not {body.n}", param="n")
        if not prompt_ids:
            raise APIError("the prompt is empty", param="prompt")
        context = self.config.context_length
        room = context - len(prompt_ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" plus {max_tokens} completion tokens" if max_tokens is not None else ""
            raise APIError(
                f"this model's maximum context length is {context} tokens; the prompt has "
                f"{len(prompt_ids)} tokens{asked}", param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        given = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p") if getattr(body, k) is not None}
        sampling = SamplingParams(
            **{**self.config.sampling_defaults, **given},
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
        )
        return GenerationJob(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens if max_tokens is not None else room,
            sampling=sampling,
            stop=body.stop_list(),
            top_logprobs=top_logprobs,
            boundaries=list(boundaries),
        )


async def _watch_disconnect(request: Request, handle: JobHandle) -> None:
    """Cancel a non-streamed job whose client has gone (streams are cancelled by Starlette)."""
    while not handle.cancelled:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(0.1)


async def _run(request: Request, handle: JobHandle) -> AsyncIterator[Any]:
    """The job's steps; the job is cancelled if the client goes away or the consumer stops early."""
    watcher = asyncio.create_task(_watch_disconnect(request, handle))
    try:
        async for step in handle.steps():
            yield step
    finally:
        handle.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _collect(request: Request, handle: JobHandle) -> List[Step]:
    """Every step of a non-streamed job, the last one finished."""
    steps = [step async for step in _run(request, handle)]
    if not steps or steps[-1].usage is None:
        raise APIError("the generation was cancelled", status=499, code="cancelled")
    return steps


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _guarded(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that ends with [DONE] even when generation failed (after an error event)."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # noqa: BLE001  headers are sent: the error can only go in the stream
        yield fmt.sse(APIError(f"generation failed: {e}", status=500, type="server_error").to_dict())
    yield fmt.SSE_DONE


def _chat_tools(body: ChatCompletionRequest) -> Optional[List[Dict[str, Any]]]:
    """The tools to render and parse: none when ``tool_choice`` is "none"."""
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(f"'response_format': only type 'text' is supported, not '{body.response_format.type}'",
                       param="response_format.type")
    if body.tool_choice is not None and body.tool_choice not in ("auto", "none"):
        raise APIError("'tool_choice': only 'auto' and 'none' are supported (the model decides whether to call)",
                       param="tool_choice")
    if not body.tools or body.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


async def _chat(server: _Server, request: Request, body: ChatCompletionRequest) -> Union[JSONResponse, StreamingResponse]:
    server.check_model(body)
    tools = _chat_tools(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    tokenizer = server.tokenizer
    prompt_ids, boundaries = await run_in_threadpool(render_chat, tokenizer, body, tools)
    top = (body.top_logprobs or 0) if body.logprobs else None
    env = fmt.Envelope.new("chat.completion", server.config.model_id, "chatcmpl")
    job = server.job(env.id, body, prompt_ids, body.max_completion_tokens or body.max_tokens, top, boundaries)
    parser = OutputParser(
        think=think_tags(tokenizer),
        thinking=prompt_opens_thinking(tokenizer, prompt_ids),
        tools=tool_format(tokenizer) if tools else None,
        tool_specs=tools,
    )
    handle = server.submit(job)
    if body.stream:
        env.object = "chat.completion.chunk"
        return _stream(_guarded(_chat_chunks(_run(request, handle), parser, env, body.include_usage)))
    steps = await _collect(request, handle)
    last = steps[-1]
    events = parser.feed("".join(s.text for s in steps)) + parser.finish()
    choice = {
        "index": 0,
        "message": fmt.chat_message(events),
        "logprobs": fmt.chat_logprobs([s.logprob for s in steps]) if top is not None else None,
        "finish_reason": fmt.finish_reason(last.finish_reason, parser.calls),
    }
    return JSONResponse(env.wrap([choice], usage=fmt.usage_dict(last.usage)))


async def _chat_chunks(steps: AsyncIterator[Any], parser: OutputParser, env: fmt.Envelope, include_usage: bool) -> AsyncIterator[str]:
    yield fmt.sse(fmt.chat_chunk(env, {"role": "assistant", "content": ""}, with_usage=include_usage))
    async for step in steps:
        events = parser.feed(step.text) + (parser.finish() if step.finish_reason else [])
        logprobs = fmt.chat_logprobs([step.logprob]) if step.logprob is not None else None
        deltas = [fmt.delta(e) for e in events] or ([{}] if logprobs else [])
        for d in deltas:
            yield fmt.sse(fmt.chat_chunk(env, d, logprobs=logprobs, with_usage=include_usage))
            logprobs = None
        if step.finish_reason:
            finish = fmt.finish_reason(step.finish_reason, parser.calls)
            yield fmt.sse(fmt.chat_chunk(env, {}, finish=finish, with_usage=include_usage))
            if include_usage:
                yield fmt.sse(env.wrap([], usage=fmt.usage_dict(step.usage)))


def _completion_prompt(server: _Server, body: CompletionRequest) -> List[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(f"'prompt': one prompt per request is supported, not {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt_token_ids(server.tokenizer, prompt)
    bad = [t for t in prompt if not 0 <= t < server.config.vocab_size]
    if bad:
        raise APIError(f"'prompt': token id {bad[0]} is outside the vocabulary (0..{server.config.vocab_size - 1})",
                       param="prompt")
    return list(prompt)


async def _completion(server: _Server, request: Request, body: CompletionRequest) -> Union[JSONResponse, StreamingResponse]:
    server.check_model(body)
    if body.echo:
        raise APIError("'echo': not supported", param="echo")
    prompt_ids = await run_in_threadpool(_completion_prompt, server, body)
    env = fmt.Envelope.new("text_completion", server.config.model_id, "cmpl")
    job = server.job(env.id, body, prompt_ids, body.max_tokens, body.logprobs)
    handle = server.submit(job)
    if body.stream:
        return _stream(_guarded(_completion_chunks(_run(request, handle), env, body.include_usage)))
    steps = await _collect(request, handle)
    last = steps[-1]
    choice = {
        "index": 0,
        "text": "".join(s.text for s in steps),
        "logprobs": fmt.completion_logprobs([s.logprob for s in steps]) if body.logprobs is not None else None,
        "finish_reason": last.finish_reason,
    }
    return JSONResponse(env.wrap([choice], usage=fmt.usage_dict(last.usage)))


async def _completion_chunks(steps: AsyncIterator[Any], env: fmt.Envelope, include_usage: bool) -> AsyncIterator[str]:
    offset = 0
    async for step in steps:
        logprobs = fmt.completion_logprobs([step.logprob], offset) if step.logprob is not None else None
        offset += len(step.logprob.token) if step.logprob is not None else 0
        if step.text or logprobs or step.finish_reason:
            yield fmt.sse(fmt.completion_chunk(env, step.text, finish=step.finish_reason, logprobs=logprobs,
                                               with_usage=include_usage))
        if step.finish_reason and include_usage:
            yield fmt.sse(env.wrap([], usage=fmt.usage_dict(step.usage)))


def create_app(backend: Backend, config: ServerConfig) -> FastAPI:
    """The app serving ``backend``'s model under ``config.model_id``; its worker thread runs
    while the app does."""
    server = _Server(backend, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="mlx_qwenmoe", lifespan=lifespan)
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _chat(server, request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _completion(server, request, body)

    @app.get("/v1/models")
    async def models():
        card = {"id": config.model_id, "object": "model", "created": 0, "owned_by": "mlx_qwenmoe"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, **server.worker.load()}

    return app
