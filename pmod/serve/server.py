"""Running the app: `serve` blocks (the CLI); `start_server` runs it in a thread on a socket bound first (port 0:
a free port, race-free), for tests and the load benchmark."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunningServer", "build_app", "serve", "start_server"]


def build_app(model_path: str, *, dtype="auto", device: str | None = None, attn_backend: str = "auto",
              conv_template: str | None = None, served_name: str | None = None, max_batch: int = 32,
              max_queue: int = 256, prefix_cache_mb: float = 0.0, settings: dict | None = None):
    """Model, processor, engine (started) and app for `model_path`."""
    import torch

    import pmod
    from pmod.serve.app import ServeSettings, create_app
    from pmod.serve.engine import Engine

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = pmod.load_processor(model_path, template=conv_template)
    model = pmod.from_pretrained(model_path, dtype=dtype, device=device, attn_backend=attn_backend).eval()
    engine = Engine(model, processor, max_batch=max_batch, max_queue=max_queue,
                    prefix_cache_bytes=int(prefix_cache_mb * 2**20)).start()
    name = served_name or Path(str(model_path).rstrip("/")).name
    return create_app(engine, ServeSettings(model_name=name, **(settings or {})))


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        app.state.engine.close()


@dataclass
class RunningServer:
    url: str
    port: int
    app: object
    _server: object
    _thread: threading.Thread

    def stop(self, close_engine: bool = True) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        if close_engine:
            self.app.state.engine.close()


def start_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> RunningServer:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it: no Nagle wait on replies
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pmod-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    port = sock.getsockname()[1]
    return RunningServer(f"http://{host}:{port}", port, app, server, thread)
