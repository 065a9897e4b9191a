"""OpenAI chat-completion requests, checked and turned into what the engine runs; the error shape clients expect.

Only the JSON is read here (no model, no image decoding): every problem is a `RequestError` naming the field,
raised before anything is queued or allocated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pmod.multimodal.templates import IMAGE_PLACEHOLDER

__all__ = ["ChatRequest", "RequestError", "error_body", "parse_chat_request"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # OpenAI's limit on `stop` strings


class RequestError(Exception):
    """An HTTP error with OpenAI's error body: status, message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")


def error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]  # role + text, each image part as IMAGE_PLACEHOLDER in place
    images: list[str]  # image_url strings, in placeholder order
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    routing: bool = False  # pmod extension: return the routing map of the first image
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(body: dict, name: str, default, kind, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", name)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(400, f"'{name}' must be in [{lo}, {hi if hi is not None else '∞'}], got {v}", name)
    return v


def _content(msg: Any, i: int, images: list[str]) -> str:
    """A message's content as text, image parts as IMAGE_PLACEHOLDER (their URLs appended to `images`)."""
    where = f"messages[{i}].content"
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if c is None and msg.get("role") == "assistant":
        return ""
    if not isinstance(c, list) or not c:
        raise RequestError(400, f"'{where}' must be a string or a non-empty list of parts, got {type(c).__name__}", where)
    out = []
    for j, part in enumerate(c):
        p = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RequestError(400, f"'{p}.image_url' needs a 'url' string (a data: URL or an allowed path)", p)
            images.append(url)
            out.append(IMAGE_PLACEHOLDER + "\n")
        else:
            raise RequestError(400, f"'{p}': unsupported content part {kind!r}; expected 'text' or 'image_url'", p)
    return "".join(out)


def parse_chat_request(body: Any) -> ChatRequest:
    """The JSON body of POST /v1/chat/completions -> ChatRequest, or RequestError(400) naming the problem."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    images: list[str] = []
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise RequestError(400, f"'messages[{i}].role' must be one of {sorted(ROLES)}, got {role!r}", f"messages[{i}].role")
        text = _content(m, i, images)
        messages.append({"role": ROLES[m["role"]], "content": text})
    if messages[-1]["role"] == "assistant":
        raise RequestError(400, "the last message is the assistant's: end with a user message", "messages")
    if sum(m["role"] == "system" for m in messages) > 1 or any(m["role"] == "system" for m in messages[1:]):
        raise RequestError(400, "one system message at most, and only as the first message", "messages")
    n = _number(body, "n", 1, int, 1, 1)
    del n  # n > 1 is refused by the bounds above
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise RequestError(400, f"'stop' must be a string or a list of up to {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, f"'model' must be a string, got {model!r}", "model")
    max_tokens = _number(body, "max_completion_tokens", None, int, 1)
    max_tokens = _number(body, "max_tokens", max_tokens, int, 1)
    top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError(400, "'top_p' must be in (0, 1], got 0", "top_p")
    pm = body.get("pmod") or {}
    return ChatRequest(
        messages=messages, images=images, model=model, stream=stream, include_usage=bool(opts.get("include_usage")),
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=top_p, top_k=_number(body, "top_k", 0, int, 0), stop=stop,
        seed=_number(body, "seed", None, int, -(2**63), 2**63 - 1), routing=bool(isinstance(pm, dict) and pm.get("routing")),
        ignore_eos=body.get("ignore_eos") is True,
    )
