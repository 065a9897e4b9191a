"""`pmod serve`: an OpenAI-compatible server with continuous batching over the reduced KV cache, and a web page.

protocol (request JSON -> ChatRequest, errors) -> media (images) -> inputs (model rows) -> engine (the model's
one thread: continuous batching) -> app (HTTP routes, SSE) -> server (uvicorn). metrics, usage and text are
leaves. FastAPI and uvicorn come with the `serve` extra; importing this package needs neither.
"""
from pmod.serve.engine import Engine, Job, QueueFull
from pmod.serve.media import MediaPolicy
from pmod.serve.metrics import Metrics
from pmod.serve.protocol import ChatRequest, RequestError, parse_chat_request

__all__ = ["ChatRequest", "Engine", "Job", "MediaPolicy", "Metrics", "QueueFull", "RequestError", "parse_chat_request"]
