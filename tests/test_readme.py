"""Every command in README.md, run: a command the README shows and no rule here covers fails the suite, so the README
cannot go stale. Commands run as written, from a scratch folder laid out as a checkout after `pmod demo` (the
embedded checkpoints under pmod/assets/, the demo's test images under demo-output/data/); long ones run under
`-m slow`, some with sizes appended (named in their rule); the ones that need 7B weights, a GPU or a cluster resolve
their configuration (`--print-config`) or parse."""
from __future__ import annotations

import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks: continuation lines joined, comments and prompts stripped."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())  # no '#' inside the README's quoted words
            if line:
                cmds.append(line)
    return cmds


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A scratch working folder: pmod/assets -> the shipped checkpoints, demo-output/data -> the demo's test split
    (the same images `pmod demo` writes: fixed seed), questions.jsonl for `--requests`."""
    from pmod.tools.synthetic import write_split

    (tmp_path / "pmod").mkdir()
    (tmp_path / "pmod" / "assets").symlink_to(REPO / "pmod" / "assets")
    write_split(tmp_path / "demo-output" / "data", "test", 4, 64)
    (tmp_path / "questions.jsonl").write_text("".join(
        json.dumps({"id": i, "prompt": "How many objects are there? Answer with one word.",
                    "image": f"demo-output/data/images/test_00000{i}.png"}) + "\n" for i in range(3)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _pmod(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> tuple[str, str]:
    from pmod.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, (argv, out[-2000:], err[-2000:])
    return out, err


# ---------------------------------------------------------------------------------------------- the rules
def _setup_and_demo(cmd, ctx):
    assert (REPO / ".ci" / "setup").is_file()
    _pmod(["demo"], ctx.capsys)  # the defaults: 600 test questions, 96 descriptions
    summary = json.loads((ctx.cwd / "demo-output" / "demo.json").read_text())
    assert summary["relative_accuracy"] > 0.9 and summary["flops_ratio"] < 0.6


def _setup_and_tests(cmd, ctx):
    """The README's test command is what CI runs (.ci/run), and the default suite leaves the slow checks out."""
    assert cmd in (REPO / ".ci" / "run").read_text()
    assert '-m \\"not slow\\"' in (REPO / "pyproject.toml").read_text()


def _pytest(cmd, ctx):
    assert cmd in ("python -m pytest -q", "python -m pytest -q -m slow")


def _train_script(cmd, ctx):
    """train/*.py: the script exists; tests/test_embedded_default.py runs each (at a few steps)."""
    words = shlex.split(cmd)
    assert (REPO / words[1]).is_file(), words[1]
    runs = (REPO / "tests" / "test_embedded_default.py").read_text()
    assert f'"{Path(words[1]).name}"' in runs, f"no test runs {words[1]}"


def _pmod_run(cmd, ctx):
    """A `pmod` command that runs in seconds: as written."""
    argv = shlex.split(cmd)[1:]
    out, err = _pmod(argv, ctx.capsys, stdin="How many objects are there? Answer with one word.\n/quit\n"
                     if argv[0] == "chat" else None, monkeypatch=ctx.monkeypatch)
    if argv[0] == "generate":
        assert "vision tokens" in err and "convention" in err
        if "--requests" in argv:
            assert [json.loads(x)["id"] for x in out.splitlines()] == [0, 1, 2]
    if argv[0] == "flops":
        assert "convention" in out and "GFLOPs" in out
    if argv[0] == "bench":
        assert json.loads(out.splitlines()[-1])["preset"] == "tiny"


def _pmod_slow(extra: list[str]):
    def rule(cmd, ctx):
        """A long `pmod` command: as written (plus `extra`, sizes only) under -m slow."""
        _pmod(shlex.split(cmd)[1:] + extra, ctx.capsys)
    return rule


def _eval(cmd, ctx):
    pytest.importorskip("lmms_eval", reason="the eval extra is not installed")
    argv = shlex.split(cmd)[1:]
    _pmod(argv + ["--quiet"], ctx.capsys)
    out = ctx.cwd / argv[argv.index("--output") + 1]
    assert "| Synth | exact_match |" in (out / "results.md").read_text()


def _gpu_bench(cmd, ctx):
    """Needs CUDA: the arguments parse (a GPU machine runs it: eval/gpu_bench.sh)."""
    from pmod.cli import build_parser

    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert args.device == "cuda" and args.preset == "gpu-7b" and args.quick


def _train_config(cmd, ctx):
    """7B weights and data we do not have: the run's configuration resolves (`--print-config`, no model loaded)."""
    words = [w for w in shlex.split(cmd) if w != "..."]
    argv = words[words.index("pmod.training") + 1:] if "accelerate" in words else words[1:]
    if "accelerate" in words:
        assert (REPO / words[words.index("--config_file") + 1]).is_file()
        argv = ["train", *argv]
    if "--resume" in argv:  # continuing a run needs the run (tests/test_training_resume.py): the flags parse
        from pmod.cli import build_parser

        assert build_parser().parse_args(argv).resume == "latest"
        return
    out, _ = _pmod(argv + ["--print-config"], ctx.capsys)
    assert "learning_rate" in out


_SERVER: dict = {}  # one `pmod serve` of the README's, shared by its curl command and the openai example


def _readme_server(cmd: str = "pmod serve --model pmod/assets/tiny-synth-pmod --port 8000"):
    """The server `cmd` starts, on a free port instead of its --port (a shared machine may hold 8000)."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    if "srv" not in _SERVER:
        import atexit

        from pmod.cli import build_parser
        from pmod.serve.server import build_app, start_server

        args = build_parser().parse_args([w for w in shlex.split(cmd) if w != "&"][1:])
        assert (args.host, args.port) == ("127.0.0.1", 8000)
        _SERVER["srv"] = srv = start_server(build_app(str(REPO / args.model), device=args.device or "cpu"))
        atexit.register(srv.stop)
    return _SERVER["srv"]


def _pmod_serve(cmd, ctx):
    """`pmod serve ... &`: the flags parse and the server it builds answers /health (on a free port)."""
    import httpx

    assert httpx.get(_readme_server(cmd).url + "/health").json() == {"status": "ok"}


def _curl(cmd, ctx):
    """The curl example against the README's server (its port swapped in), with curl when it is installed."""
    import shutil
    import subprocess

    import httpx

    url = _readme_server().url
    words = [w.replace("http://127.0.0.1:8000", url) for w in shlex.split(cmd)]
    if shutil.which("curl"):
        out = subprocess.run(words, capture_output=True, text=True, timeout=60, check=True).stdout
    else:  # the same request without curl: -H header, -d body
        out = httpx.post(words[2], content=words[words.index("-d") + 1], headers=dict(
            [words[words.index("-H") + 1].split(": ", 1)])).text
    reply = json.loads(out)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"].strip()


SLOW = True
RULES: list[tuple[str, object, bool]] = [  # (the command, as a regular expression; how it is run; under -m slow)
    (r"bash \.ci/setup && \.venv/bin/pmod demo", _setup_and_demo, SLOW),
    (r"bash \.ci/setup test,train,eval && \.venv/bin/python -m pytest -q", _setup_and_tests, False),
    (r"python -m pytest -q( -m slow)?", _pytest, False),
    (r"python train/\w+\.py.*", _train_script, False),
    (r"pmod (generate|chat|flops) .*", _pmod_run, False),
    (r"pmod bench --preset tiny .*", _pmod_run, False),
    (r"pmod bench --preset cpu --quick .*", _pmod_slow([]), SLOW),
    (r"pmod bench --device cuda .*", _gpu_bench, False),
    (r"pmod compare-strategies .*", _pmod_slow(["--rows", "full,lora", "--steps", "3", "--base-steps", "2",
                                                "--batch-size", "4", "--n-train", "12", "--n-val", "6"]), SLOW),
    (r"pmod compare-methods .*", _pmod_slow(["--n-test", "8", "--methods", "fastv", "--budgets", "pmod"]), SLOW),
    (r"pmod eval .*--tasks pmod_synth.*", _eval, SLOW),
    (r"pmod serve --model \S+ --port 8000 &", _pmod_serve, False),
    (r"curl -s http://127\.0\.0\.1:8000/v1/chat/completions .*", _curl, False),
    (r"(pmod train|accelerate launch --config_file \S+ -m pmod\.training) .*", _train_config, False),
]


class Ctx:
    def __init__(self, capsys, monkeypatch, cwd):
        self.capsys, self.monkeypatch, self.cwd = capsys, monkeypatch, cwd


def _rule(cmd: str):
    return next(((fn, slow) for pat, fn, slow in RULES if re.fullmatch(pat, cmd)), (None, False))


def test_every_readme_command_has_a_rule():
    cmds = readme_commands()
    assert len(cmds) >= 15 and "bash .ci/setup && .venv/bin/pmod demo" == cmds[0]  # the README opens with the two
    assert cmds[1] == "bash .ci/setup test,train,eval && .venv/bin/python -m pytest -q"  # fresh-machine commands
    missing = [c for c in cmds if _rule(c)[0] is None]
    assert not missing, f"README commands no rule in tests/test_readme.py runs: {missing}"


@pytest.mark.parametrize("cmd", [pytest.param(c, marks=[pytest.mark.slow] if _rule(c)[1] else [])
                                 for c in readme_commands()])
def test_readme_command(cmd, capsys, monkeypatch, checkout):
    rule = _rule(cmd)[0]
    if rule is None:
        pytest.fail(f"no rule for {cmd!r}")
    rule(cmd, Ctx(capsys, monkeypatch, checkout))


def test_python_api_example_runs(checkout, capsys):
    """The README's Python block on the embedded default (the 7B hub id, bf16 and CUDA swapped for it), with a
    generated image for photo.jpg."""
    import shutil

    code = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    shutil.copy(checkout / "demo-output" / "data" / "images" / "test_000000.png", checkout / "photo.jpg")
    code = (code.replace('"MCG-NJU/p-MoD-LLaVA-NeXT-7B"', repr(str(REPO / "pmod" / "assets" / "tiny-synth-pmod")))
            .replace("torch.bfloat16", "torch.float32").replace('device="cuda"', 'device="cpu"'))
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip(), "the example printed no answer"


def test_serve_client_example_runs(checkout, capsys):
    """The README's openai client example, against the README's server (its port swapped in)."""
    pytest.importorskip("openai")
    code = next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "from openai import OpenAI" in b)
    exec(compile(code.replace("http://127.0.0.1:8000", _readme_server().url), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    answer, kept, kv = printed[0].rsplit(" ", 2)
    assert answer.strip() and 0 < float(kept) < 1 and int(kv) > 0
    assert printed[1].strip()  # the streamed answer
