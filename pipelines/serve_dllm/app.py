"""The OpenAI-compatible ASGI app (FastAPI) over the continuous-batching :class:`Engine`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``, ``GET /metrics``. Every error is an OpenAI-shaped body
``{"error": {"message", "type", "param", "code"}}`` with status 400 (bad request), 404 (unknown
model or path), 429 (queue full), 503 (shutting down) or 500 (a failed forward pass; no
traceback). Responses carry ``usage`` and ``dllm`` (the request's
:class:`~tokenprune.stats.TokenStats` figures, see ``docs/localleap.md``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .engine import Engine, EngineClosed, QueueFull, RequestResult
from .metrics import Metrics
from .options import DecodeOptions, check_options, gen_length_for
from .text import TextAssembler

__all__ = ["ServeSettings", "create_app", "ApiError"]

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass
class ServeSettings:
    """What the app needs besides the engine: the served model name, the default decoding
    options and ``max_tokens``, and the model's context length (prompt + canvas)."""

    model_name: str
    defaults: DecodeOptions
    default_max_tokens: int = 256
    max_context: int | None = None


class ApiError(Exception):
    """An error answered with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {429: "rate_limit_error", 404: "not_found_error", 503: "service_unavailable"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


class Overrides(BaseModel):
    """The decoding options a request may override (extra body fields; see DecodeOptions)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rule: Literal["localleap", "fastdllm", "llada", "eb"] | None = None
    threshold: float | None = None
    relaxed_threshold: float | None = None
    radius: int | None = None
    gamma: float | None = None
    steps: int | None = None
    block_length: int | None = None
    cache: Literal["none", "prefix", "dual"] | None = None
    top_k: int | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Common(Overrides):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class CompletionBody(Common):
    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first invalid field (or the malformed JSON) and the parameter."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('msg')}); send a JSON object", None
    if err.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}: not an option of this server", loc[0] if loc else None
    where = ".".join(loc) or "body"
    return f"{where}: {err.get('msg')}", loc[0] if loc else None


class JobStream(StreamingResponse):
    """A streamed generation whose chunk generator is closed as soon as the response ends.

    When the client goes away, Starlette stops at a failed ``send`` and leaves the generator
    suspended at its ``yield``; its ``finally`` (which frees the request's row) would then wait
    for garbage collection. Closing it here frees the row at once.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class StatusCounter:
    """Pure ASGI middleware: counts responses by endpoint and status (streaming-safe)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.on_request(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: Engine, tokenizer, settings: ServeSettings, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine thread and, at shutdown (after uvicorn
    has finished the in-flight requests), drains and stops it."""
    metrics = metrics or engine.metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="prunekit serve-dllm", lifespan=lifespan)
    app.add_middleware(StatusCounter, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue": engine.queue_length()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "prunekit"}
        return {"object": "list", "data": [card]}

    def prepare(body: Common, max_tokens: int | None):
        """(options, max_tokens, stops) of a request, or an ApiError 400/404."""
        if body.model is not None and body.model != settings.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; use {settings.model_name!r}", param="model")
        if body.n != 1:
            raise ApiError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
        max_tokens = settings.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be a positive integer, got {max_tokens}", param="max_tokens")
        overrides = {k: getattr(body, k) for k in Overrides.model_fields}
        opts = settings.defaults.with_overrides(**overrides, temperature=body.temperature, top_p=body.top_p)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:  # an option localleap_generate would refuse is the client's error
            check_options(opts, gen_length_for(max_tokens, opts.block_length), dual_ok=engine.dual_ok)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return opts, max_tokens, stops

    def check_context(prompt: list[int], max_tokens: int, opts: DecodeOptions) -> None:
        total = len(prompt) + gen_length_for(max_tokens, opts.block_length)
        if settings.max_context is not None and total > settings.max_context:
            raise ApiError(
                400,
                f"the prompt ({len(prompt)} tokens) plus max_tokens {max_tokens} (canvas of {total - len(prompt)}, "
                f"whole blocks of {opts.block_length}) is {total} tokens, more than the model's context of "
                f"{settings.max_context}; shorten the prompt or lower max_tokens",
                param="prompt",
            )

    def encode_prompt(prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(
                    400, "send one prompt per request (a list of several strings is a batch)", param="prompt"
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ApiError(
                    400, "this model folder ships no tokenizer: send the prompt as token ids", param="prompt"
                )
            return list(tokenizer.encode(prompt))
        return list(prompt)

    def encode_chat(messages: list[Message]) -> list[int]:
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ApiError(
                400,
                f"model {settings.model_name!r} has no chat template (its tokenizer_config.json defines no "
                "chat_template); use /v1/completions with a plain prompt, or serve a chat (Instruct) folder",
                param="messages",
            )
        msgs = [{"role": m.role, "content": m.text()} for m in messages]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(ids: list[int]) -> str:
        if tokenizer is None:
            return " ".join(map(str, ids))
        return tokenizer.decode(ids, skip_special_tokens=True)

    async def run(request: Request, body: Common, prompt: list[int], max_tokens: int, chat: bool):
        opts, max_tokens, stops = prepare(body, max_tokens)
        if not prompt:
            raise ApiError(400, "the prompt is empty; give at least one token", param="prompt")
        check_context(prompt, max_tokens, opts)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        jobs: list[Job] = []

        def listener(kind, payload):  # engine thread -> event loop
            if kind == "done" and jobs and jobs[0].abandoned:  # nobody reads the queue any more
                jobs[0].result = payload
                jobs[0].record()
                return
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        try:
            req = engine.submit(prompt, max_tokens, opts, seed=body.seed, listener=listener)
        except QueueFull as exc:
            raise ApiError(429, str(exc)) from None
        except EngineClosed as exc:
            raise ApiError(503, str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        job = Job(req, events, TextAssembler(decode, stops), opts, prompt, chat)
        jobs.append(job)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return JobStream(job.stream(include_usage), media_type="text/event-stream")
        return await job.complete(request)

    class Job:
        """One generation: engine events -> text deltas / the final response."""

        def __init__(self, req, events, text, opts, prompt, chat):
            self.req, self.events, self.text, self.opts, self.prompt, self.chat = req, events, text, opts, prompt, chat
            self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            self.created = int(time.time())
            self.first_block_s = None
            self.result: RequestResult | None = None
            self.abandoned = False

        async def next_delta(self, timeout: float | None = None):
            """The next text delta (str), or None once the request is done."""
            kind, payload = await asyncio.wait_for(self.events.get(), timeout)
            if kind == "block":
                if self.first_block_s is None:
                    self.first_block_s = time.perf_counter() - self.req.submitted
                delta = self.text.feed(payload)
                if self.text.stopped and not self.req.cancelled.is_set():
                    self.req.cancel()  # a stop string: the rest is not needed
                    engine.notify()
                return delta
            self.result = payload
            self.record()
            return None

        def record(self):
            r = self.result
            metrics.on_generation(
                tokens_in=len(self.prompt),
                tokens_out=self.text.tokens_used(),
                forward_passes=r.forward_passes,
                latency_s=r.latency_s,
                first_block_s=self.first_block_s,
                cancelled=r.finish_reason == "cancelled" and not self.text.stopped,
            )

        def finish_reason(self) -> str:
            if self.result.finish_reason == "error":
                raise ApiError(500, f"generation failed: {self.result.error}")
            return "stop" if self.text.stopped else self.result.finish_reason

        def usage(self) -> dict:
            out = self.text.tokens_used()
            return {"prompt_tokens": len(self.prompt), "completion_tokens": out, "total_tokens": len(self.prompt) + out}

        def envelope(self, choices: list, **extra) -> dict:
            kind = "chat.completion" if self.chat else "text_completion"
            return {"id": self.id, "object": kind, "created": self.created, "model": settings.model_name,
                    "choices": choices, **extra}  # fmt: skip

        async def complete(self, request: Request) -> dict:
            try:
                while self.result is None:
                    try:
                        await self.next_delta(timeout=0.25)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return PlainTextResponse("", status_code=499)
            finally:
                self.abandon()
            text = self.text.text
            reason = self.finish_reason()
            if self.chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return self.envelope([choice], usage=self.usage(), dllm=self.result.stats.as_dict())

        def chunk(self, delta: str, reason=None, **extra) -> str:
            if self.chat:
                choice = {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            body = self.envelope([choice], **extra)
            body["object"] = "chat.completion.chunk" if self.chat else "text_completion"
            return f"data: {json.dumps(body)}\n\n"

        async def stream(self, include_usage: bool):
            """SSE chunks: one per committed block (its final text), the last with the
            finish_reason, ``usage`` and ``dllm``; then ``data: [DONE]``."""
            try:
                if self.chat:
                    body = self.envelope([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
                    body["object"] = "chat.completion.chunk"
                    yield f"data: {json.dumps(body)}\n\n"
                while True:
                    delta = await self.next_delta()
                    if delta is None:
                        break
                    if delta:
                        yield self.chunk(delta)
                try:
                    reason = self.finish_reason()
                except ApiError as exc:
                    yield f"data: {exc.response().body.decode()}\n\n"
                    return
                stats = self.result.stats.as_dict()
                yield self.chunk(self.text.finish(), reason, usage=self.usage(), dllm=stats)
                if include_usage:  # OpenAI's extra usage chunk (no choices)
                    body = self.envelope([], usage=self.usage())
                    body["object"] = "chat.completion.chunk" if self.chat else "text_completion"
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.abandon()

        def abandon(self):
            """Free the row when the client left before the end (stream closed, disconnect)."""
            if self.result is None:
                self.abandoned = True
                self.req.cancel()
                engine.notify()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        return await run(request, body, encode_prompt(body.prompt), body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await run(request, body, encode_chat(body.messages), max_tokens, chat=True)

    return app
