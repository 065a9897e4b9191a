"""`pmod chat` and `pmod generate` as a user drives them: stdin fed to the real command (a subprocess), the session's
messages seen in process, and the batch mode (`--requests FILE.jsonl`)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_model, tiny_tokenizer
from PIL import Image

from pmod.multimodal.processor import PmodProcessor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(layers=4, vocab_size=48)
    model.save_pretrained(folder)
    PmodProcessor(tiny_tokenizer(), model.config).save_pretrained(folder)
    Image.new("RGB", (50, 30), (200, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (20, 40), (10, 10, 200)).save(folder / "blue.png")
    return folder


def test_chat_session_through_stdin(checkpoint):
    """A mistyped /image is a message and the session goes on; /image starts a new conversation about that image and
    says so; an over-long turn names /reset; after /reset the session answers again."""
    long = " ".join(["red"] * 600)  # past the tiny model's 512-token context
    script = "\n".join(["/image nope.png", "what color?", f"/image {checkpoint / 'red.png'}", "what color?",
                        long, "/reset", "how many?", "/quit", ""])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pmod.cli", "chat", "--model", str(checkpoint), "--device", "cpu",
                           "--max-new-tokens", "3"], input=script, capture_output=True, text=True, timeout=300,
                          env=env, cwd=checkpoint)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    assert "error: no image file at nope.png; the conversation goes on as it was" in err
    assert f"(new conversation about {checkpoint / 'red.png'}: one image per conversation" in err
    assert "past the model's context of 512 tokens; /reset starts a new conversation" in err
    assert "(new conversation, no image)" in err
    assert out.count("ASSISTANT: ") == 4  # three answered turns and the refused one
    summaries = [ln for ln in err.splitlines() if ln.startswith("[vision tokens")]
    assert [s.split(",")[0] for s in summaries] == ["[vision tokens 0", "[vision tokens 9", "[vision tokens 0"]


def _chat(monkeypatch, checkpoint, lines: list[str], *argv: str) -> tuple[int, list[list[dict]]]:
    """Run `pmod chat` in process on `lines`; returns (exit status, the messages of every answered turn)."""
    import pmod.cli as cli
    import pmod.tools.answer as answers

    seen, answer = [], answers.answer

    def spy(model, processor, messages, images, args, out=None, **kw):
        seen.append([dict(m, images=len(images)) for m in messages])
        return answer(model, processor, messages, images, args, out, **kw)

    monkeypatch.setattr(answers, "answer", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines + ["/quit", ""])))
    return cli.main(["chat", "--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "2", *argv]), seen


def test_image_command_starts_a_new_conversation(monkeypatch, checkpoint, capsys):
    rc, seen = _chat(monkeypatch, checkpoint, ["hi", f"/image {checkpoint / 'red.png'}", "what color?", "and now?",
                                               f"/image {checkpoint / 'blue.png'}", "what?"])
    assert rc == 0 and [len(s) for s in seen] == [1, 1, 3, 1]  # history cleared by each /image
    assert [s[-1]["images"] for s in seen] == [0, 1, 1, 1]  # one image per conversation, never two
    assert "unknown command" not in capsys.readouterr().err


def test_chat_system_prompt_and_template(monkeypatch, checkpoint, capsys):
    from pmod.multimodal.processor import PmodProcessor as P

    rendered, apply = [], P.apply_template
    monkeypatch.setattr(P, "apply_template", lambda self, m, **kw: rendered.append(apply(self, m, **kw)) or rendered[-1])
    rc, seen = _chat(monkeypatch, checkpoint, ["hi"], "--system", "Answer in one word.", "--conv-template", "llava_v1")
    assert rc == 0 and seen[0][0]["role"] == "system"
    assert rendered[-1] == "Answer in one word. USER: hi ASSISTANT:"  # llava_v1's turns under the given system prompt
    rc, _ = _chat(monkeypatch, checkpoint, ["hi"], "--conv-template", "chatml")
    assert rc == 0 and rendered[-1].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    from pmod.cli import main

    assert main(["chat", "--model", str(checkpoint), "--conv-template", "nope"]) == 2
    assert "unknown conversation template 'nope'" in capsys.readouterr().err
    assert main(["chat", "--model", str(checkpoint), "--conv-template", "chat_nosys", "--system", "x"]) == 2
    assert "'chat_nosys' has no system prompt" in capsys.readouterr().err


def _generate(capsys, checkpoint, *argv: str) -> tuple[int, str, str]:
    from pmod.cli import main

    rc = main(["generate", "--model", str(checkpoint), "--device", "cpu", "--max-new-tokens", "4", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_requests_batch_equals_one_prompt_each(checkpoint, tmp_path, capsys):
    """--requests: one JSON line per request in the file's order, each answer the one `--prompt` gives alone."""
    (tmp_path / "img").mkdir()
    for name in ("red.png", "blue.png"):
        (tmp_path / "img" / name).write_bytes((checkpoint / name).read_bytes())
    reqs = [{"id": "a", "prompt": "what color?", "image": "img/red.png"}, {"prompt": "how many?"},
            {"id": 7, "prompt": "what is in this image?", "image": ["img/blue.png", "img/red.png"]}]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    rc, out, err = _generate(capsys, checkpoint, "--requests", str(path), "--batch-size", "2")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [r["id"] for r in rows] == ["a", 1, 7] and err.count("[requests") == 2
    for req, row in zip(reqs, rows):
        images = [str(tmp_path / x) for x in ([req["image"]] if isinstance(req.get("image"), str) else req.get("image", []))]
        rc, alone, _ = _generate(capsys, checkpoint, "--prompt", req["prompt"], *[a for i in images for a in ("--image", i)])
        assert rc == 0 and alone.strip() == row["answer"], (req, row)


def test_generate_requests_errors_are_named(checkpoint, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "image": "../outside.png"}) + "\n")
    rc, _, err = _generate(capsys, checkpoint, "--requests", str(path))
    assert rc == 2 and "'../outside.png' lies outside the image folder" in err
    path.write_text(json.dumps({"prompt": "hi", "image": "nope.png"}) + "\n")
    rc, _, err = _generate(capsys, checkpoint, "--requests", str(path))
    assert rc == 2 and "r.jsonl, line 1: no image file 'nope.png'" in err
    path.write_text('{"prompt": "hi"}\n{"question": "no prompt"}\n')
    rc, _, err = _generate(capsys, checkpoint, "--requests", str(path))
    assert rc == 2 and "r.jsonl, line 2" in err and '"prompt" string' in err
    rc, _, err = _generate(capsys, checkpoint)
    assert rc == 2 and "--prompt" in err and "--requests" in err


def test_chat_keeps_the_cache_across_turns(monkeypatch, checkpoint, capsys):
    """The second and third turns continue the first turn's cache (their summaries say how little they prefilled);
    /reset drops it, so the next turn prefills from scratch again."""
    rc, seen = _chat(monkeypatch, checkpoint, [f"/image {checkpoint / 'red.png'}", "what color?", "and now?", "how many?",
                                               "/reset", "hi"])
    err = capsys.readouterr().err
    assert rc == 0 and [len(s) for s in seen] == [1, 3, 5, 1]
    summaries = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert [s.startswith("[continued a cache of") for s in summaries] == [False, True, True, False], summaries
