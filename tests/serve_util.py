"""Shared by the serve tests: a server on a free loopback port, test images as data URLs, one-by-one answers."""
from __future__ import annotations

import base64
import contextlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PMOD = REPO / "pmod" / "assets" / "tiny-synth-pmod"
DENSE = REPO / "pmod" / "assets" / "tiny-synth-dense"
QUESTIONS = ["How many objects are there? Answer with one word.", "What colour is the largest object?",
             "Is there a circle? Answer yes or no.", "Describe the image."]

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e .[serve])")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e .[serve])")


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def write_images(folder: Path, n: int) -> list[Path]:
    from pmod.tools.synthetic import write_split

    write_split(folder, "test", n, 64)
    return sorted((folder / "images").glob("*.png"))


def user_message(question: str, image: Path | None) -> list[dict]:
    if image is None:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": question}]}]


@contextlib.contextmanager
def running_server(model_path: Path = PMOD, **kw):
    from pmod.serve.server import build_app, start_server

    settings = kw.pop("settings", {})
    srv = start_server(build_app(str(model_path), device="cpu", settings=settings, **kw))
    try:
        yield srv
    finally:
        srv.stop()


class Reference:
    """`model.generate` one request at a time: the answers the server must give."""

    def __init__(self, model_path: Path = PMOD):
        import pmod

        self.model = pmod.from_pretrained(str(model_path), device="cpu").eval()
        self.processor = pmod.load_processor(str(model_path))

    def answer(self, question: str, image: Path | None, max_tokens: int) -> str:
        from pmod.multimodal.images import load_image

        content = question if image is None else "<image>\n" + question
        inputs = self.processor([{"role": "user", "content": content}], images=[load_image(image)] if image else None)
        tokens = self.model.generate(**inputs, max_new_tokens=max_tokens)
        return self.processor.decode(tokens[0])
