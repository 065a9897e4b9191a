"""The HTTP side (FastAPI, the `serve` extra): OpenAI's chat-completions API (plain and server-sent events), /v1/models, /health, /metrics and
the web page, over one `Engine`. Request checking (JSON, images, context) runs here, before anything is queued."""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from pmod.serve.engine import Engine, Job, QueueFull
from pmod.serve.inputs import context_length, request_inputs
from pmod.serve.media import MediaPolicy, load_request_images
from pmod.serve.protocol import ChatRequest, RequestError, error_body, parse_chat_request

__all__ = ["ServeSettings", "create_app"]

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
POLL_S = 0.25  # how often a waiting request looks for its client having gone
GRACE_S = 30.0  # past its timeout by this much, a request stops waiting for the engine (stuck in one long step)
PREP_THREADS = 2  # requests decoding images / tokenising at once: more only oversubscribe the cores the engine needs
DRAIN_LIMIT = 256 * 2**20  # an over-long body is read (and dropped) up to this, so the client sees the 413


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 16 * 2**20
    request_timeout_s: float = 600.0
    retry_after_s: int = 1
    media: MediaPolicy = field(default_factory=MediaPolicy)


def create_app(engine: Engine, settings: ServeSettings):
    app = FastAPI(title="pmod serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    name = settings.model_name
    prep = anyio.CapacityLimiter(PREP_THREADS)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.kind), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {settings.api_key}".encode()):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "down", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(name), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "pmod", "max_model_len": context_length(engine.model)}]}

    @app.get("/")
    async def index():
        return static_file("index.html")

    @app.get("/static/{file}")
    async def static(file: str):
        return static_file(file)

    def static_file(file: str):
        if file not in STATIC:
            raise RequestError(404, f"no such file {file!r}")
        return Response(resources.files("pmod.serve").joinpath("static", file).read_bytes(), media_type=STATIC[file])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = parse_chat_request(_json(await _read_body(request, settings.max_body_bytes)))
        if req.model is not None and req.model != name:
            raise RequestError(404, f"The model `{req.model}` does not exist (this server serves `{name}`).", "model")
        images = await anyio.to_thread.run_sync(load_request_images, req.images, settings.media, engine.processor, limiter=prep)
        inputs, n_prompt, max_tokens = await anyio.to_thread.run_sync(request_inputs, engine.model, engine.processor, req,
                                                                      images, limiter=prep)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(inputs, n_prompt, max_tokens, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                  temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop,
                  routing=req.routing, ignore_eos=req.ignore_eos, timeout_s=settings.request_timeout_s)
        if not engine.alive:
            raise RequestError(503, f"the engine is not running ({engine.error!r}); restart the server")
        try:
            engine.submit(job)
        except QueueFull as e:
            raise RequestError(429, f"the server is busy: {e}; retry later", headers={"Retry-After": str(settings.retry_after_s)})
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:
            return StreamingResponse(_sse(request, job, events, head, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            ev = await _next(request, job, events)
            if ev is None:
                return Response(status_code=499)  # the client is gone; nobody reads this
            if ev["type"] == "error":
                raise RequestError(ev["status"], ev["message"])
            if ev["type"] == "done":
                return {**head, "object": "chat.completion", "usage": _usage(ev, req),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": ev["text"]},
                                     "finish_reason": ev["finish_reason"], "logprobs": None}]}

    return app


async def _read_body(request, cap: int) -> bytes:
    """The body, or RequestError(413) once it passes `cap` bytes (the rest is read and dropped, up to DRAIN_LIMIT,
    so that a client still sending sees the status rather than a reset connection)."""
    data, n = bytearray(), 0
    async for chunk in request.stream():
        n += len(chunk)
        if n <= cap:
            data += chunk
        elif n > DRAIN_LIMIT:
            break
    if n > cap:
        raise RequestError(413, f"the request body is over {cap // 2**20} MiB (--max-body-mb); send smaller images")
    return bytes(data)


def _json(body: bytes):
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})") from None


async def _next(request, job: Job, events: asyncio.Queue) -> dict | None:
    """The job's next event; None (and the job cancelled) once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return None
            if time.monotonic() - job.submitted > job.timeout_s + GRACE_S:
                job.cancel()
                return {"type": "error", "status": 504, "message": f"the request timed out after {job.timeout_s:g} s"}


def _usage(ev: dict, req: ChatRequest) -> dict:
    usage = ev["usage"]
    if req.routing and ev.get("routing") is not None:
        usage = {**usage, "pmod": {**usage["pmod"], "routing": ev["routing"]}}
    return usage


async def _sse(request, job: Job, events: asyncio.Queue, head: dict, req: ChatRequest):
    """OpenAI's chunk stream: a role chunk, content chunks, a finish chunk, the usage chunk if asked, [DONE]."""
    def chunk(choices, **extra) -> str:
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    try:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            ev = await _next(request, job, events)
            if ev is None:
                return
            if ev["type"] == "delta":
                yield chunk([{"index": 0, "delta": {"content": ev["text"]}, "finish_reason": None}])
            elif ev["type"] == "error":  # headers are sent: the error travels in the stream, as vLLM does it
                yield "data: " + json.dumps(error_body(ev["status"], ev["message"], kind="server_error")) + "\n\n"
                break
            else:
                yield chunk([{"index": 0, "delta": {}, "finish_reason": ev["finish_reason"]}])
                if req.include_usage:
                    yield chunk([], usage=_usage(ev, req))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op once the job is done; a stream closed early (client gone) frees its row
