"""Load benchmark of `pmod serve` on loopback: concurrent clients through the HTTP server, latency and throughput.

Part `tiny` (the shipped p-MoD model): C clients x R requests each at once with continuous batching, against the
same requests served one at a time (one client, each request alone), in interleaved rounds; every greedy answer is
checked against `model.generate` run one request at a time. Part `cpu` (the `pmod bench` CPU shape, random weights,
p-MoD PRD and its dense twin sharing every weight): the same concurrent load on each, interleaved, latency
p50 / p99 and throughput. The last stdout line is JSON; --output DIR also gets results.json.

  python eval/serve_load.py                      # both parts (tiny: 32 x 4; cpu: 8 x 2), ~10 min on 2 cores
  python eval/serve_load.py --parts tiny --rounds 1
"""
from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pmod" / "assets" / "tiny-synth-pmod"
QUESTIONS = ["How many objects are there? Answer with one word.", "What colour is the largest object?",
             "Is there a circle? Answer yes or no.", "Describe the image."]


def bodies(images: list[Path], n: int, max_tokens: int, ignore_eos: bool) -> list[dict]:
    """n chat requests: questions x images (every fourth without an image), greedy."""
    urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        content = q if i % 4 == 3 else [{"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                                        {"type": "text", "text": q}]
        out.append({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens,
                    "ignore_eos": ignore_eos})
    return out


def one(client: httpx.Client, url: str, body: dict) -> tuple[str, float, int]:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    j = r.json()
    return j["choices"][0]["message"]["content"], time.perf_counter() - t0, j["usage"]["completion_tokens"]


def concurrent(url: str, reqs: list[dict], clients: int) -> dict:
    """`clients` threads, client c sending requests c, c + clients, ... one after the other."""
    answers, lat, toks, errors = [None] * len(reqs), [0.0] * len(reqs), [0] * len(reqs), []

    def work(c):
        with httpx.Client(timeout=600) as cl:
            for i in range(c, len(reqs), clients):
                try:
                    answers[i], lat[i], toks[i] = one(cl, url, reqs[i])
                except Exception as e:  # noqa: BLE001 -- counted, reported
                    errors.append(f"request {i}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(answers, lat, toks, errors, time.perf_counter() - t0)


def sequential(url: str, reqs: list[dict]) -> dict:
    answers, lat, toks, errors = [], [], [], []
    t0 = time.perf_counter()
    with httpx.Client(timeout=600) as cl:
        for i, b in enumerate(reqs):
            try:
                a, s, n = one(cl, url, b)
            except Exception as e:  # noqa: BLE001
                errors.append(f"request {i}: {type(e).__name__}: {e}")
                a, s, n = None, 0.0, 0
            answers.append(a), lat.append(s), toks.append(n)
    return _summary(answers, lat, toks, errors, time.perf_counter() - t0)


def _summary(answers, lat, toks, errors, wall) -> dict:
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return {"answers": answers, "errors": errors, "wall_s": wall, "requests": len(lat), "completion_tokens": sum(toks),
            "p50_s": statistics.median(lat), "p99_s": q[98], "req_per_s": len(lat) / wall, "tok_per_s": sum(toks) / wall}


def reference(model, processor, reqs: list[dict]) -> list[str]:
    """`model.generate` one request at a time: what every answer must be."""
    from pmod.multimodal.images import load_image

    out = []
    for b in reqs:
        c = b["messages"][0]["content"]
        img = [load_image(base64.b64decode(c[0]["image_url"]["url"].split(",", 1)[1]))] if isinstance(c, list) else None
        text = c if img is None else "<image>\n" + c[1]["text"]
        inputs = processor([{"role": "user", "content": text}], images=img)
        toks = model.generate(**inputs, max_new_tokens=b["max_tokens"], eos_token_id=[] if b["ignore_eos"] else None)
        out.append(processor.decode(toks[0]))
    return out


def _server(model, processor, name: str, max_batch: int, prefix_cache_mb: float = 0.0):
    from pmod.serve.app import ServeSettings, create_app
    from pmod.serve.engine import Engine
    from pmod.serve.server import start_server

    engine = Engine(model, processor, max_batch=max_batch, max_queue=4096, prefix_cache_bytes=int(prefix_cache_mb * 2**20))
    return start_server(create_app(engine.start(),
                                   ServeSettings(model_name=name)))


def _counted(srv, fn) -> dict:
    """fn()'s run, with the model calls it took (deterministic where timing is not: packed prefills, decode steps)."""
    c = srv.app.state.engine.metrics.counters
    keys = ("prefill_batches", "decode_steps", "prefill_seconds", "decode_seconds")
    before = {k: c[k] for k in keys}
    run = fn()
    run.update({k: (int if k.endswith(("batches", "steps")) else float)(c[k] - v) for k, v in before.items()})
    return run


def _strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "answers"}


def part_tiny(args, folder: Path) -> dict:
    import pmod
    from pmod.tools.synthetic import write_split

    write_split(folder, "test", 8, 64)
    images = sorted((folder / "images").glob("*.png"))
    model = pmod.from_pretrained(str(TINY), device="cpu").eval()
    processor = pmod.load_processor(str(TINY))
    out = {}
    for label, ignore_eos in (("greedy, stops at EOS", False), (f"{args.tiny_tokens} tokens each (ignore_eos)", True)):
        reqs = bodies(images, args.clients * args.requests, args.tiny_tokens, ignore_eos)
        want = reference(model, processor, reqs)
        srv = _server(model, processor, "tiny-synth-pmod", args.max_batch, args.prefix_cache_mb)
        rounds = []
        try:
            for _ in range(args.rounds):  # interleaved: each round runs both modes back to back
                cb = _counted(srv, lambda: concurrent(srv.url, reqs, args.clients))
                seq = _counted(srv, lambda: sequential(srv.url, reqs))
                for run in (cb, seq):
                    run["mismatches"] = sum(a != w for a, w in zip(run["answers"], want))
                rounds.append({"continuous": _strip(cb), "one_at_a_time": _strip(seq), "ratio": cb["req_per_s"] / seq["req_per_s"]})
        finally:
            srv.stop()
        out[label] = {"rounds": rounds, "ratio_median": statistics.median(r["ratio"] for r in rounds)}
        print(f"[tiny, {label}] continuous vs one at a time: " + ", ".join(
            f"{r['ratio']:.2f}x (errors {len(r['continuous']['errors'])}, mismatches "
            f"{r['continuous']['mismatches']}+{r['one_at_a_time']['mismatches']}; model calls "
            f"{r['continuous']['prefill_batches']}+{r['continuous']['decode_steps']} vs "
            f"{r['one_at_a_time']['prefill_batches']}+{r['one_at_a_time']['decode_steps']}; engine in prefill + decode "
            f"{r['continuous']['prefill_seconds']:.2f}+{r['continuous']['decode_seconds']:.2f} s of "
            f"{r['continuous']['wall_s']:.2f} vs {r['one_at_a_time']['prefill_seconds']:.2f}+"
            f"{r['one_at_a_time']['decode_seconds']:.2f} s of {r['one_at_a_time']['wall_s']:.2f})" for r in rounds), file=sys.stderr)
    return out


def part_cpu(args, folder: Path) -> dict:
    from pmod.bench.models import build_dense, with_routers
    from pmod.bench.presets import PRESETS
    from pmod.config import ModConfig
    from pmod.multimodal.processor import PmodProcessor, load_tokenizer
    from pmod.tools.synthetic import write_split

    preset = PRESETS["cpu"]
    dense = build_dense(preset, "cpu")
    models = {"p-MoD (PRD)": with_routers(dense, ModConfig(), preset.router_std), "dense": dense}
    write_split(folder, "test", 4, dense.config.vision.image_size)
    images = sorted((folder / "images").glob("*.png"))
    reqs = bodies(images, args.cpu_clients * args.cpu_requests, args.cpu_tokens, True)
    tok = load_tokenizer(TINY)  # text ids < 57 are valid ids of the 32000 vocab; decode skips the unknown ones
    servers = {k: _server(m, PmodProcessor(tok, m.config, template="chat_nosys"), k, args.max_batch) for k, m in models.items()}
    runs = {k: [] for k in models}
    try:
        for _ in range(args.rounds):
            for k, srv in servers.items():
                runs[k].append(_strip(concurrent(srv.url, reqs, args.cpu_clients)))
                print(f"[cpu, {k}] p50 {runs[k][-1]['p50_s']:.2f} s, {runs[k][-1]['tok_per_s']:.1f} tok/s", file=sys.stderr)
        metrics = {k: httpx.get(s.url + "/metrics").text for k, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("p50_s", "p99_s", "req_per_s", "tok_per_s", "wall_s")}
           for k, v in runs.items()}
    saved = {k: [float(line.split()[-1]) for line in t.splitlines() if line.startswith("pmod_prefill_flops_saved_total")][0]
             for k, t in metrics.items()}
    return {"rounds": runs, "median": med, "prefill_flops_saved": saved,
            "shape": f"cpu preset: {dense.config.text.num_hidden_layers} layers, hidden {dense.config.text.hidden_size}, "
                     f"{dense.config.vision.num_patches} vision tokens per image, float32, random weights"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="tiny,cpu")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4, help="requests per client (tiny part)")
    p.add_argument("--tiny-tokens", type=int, default=32)
    p.add_argument("--cpu-clients", type=int, default=8)
    p.add_argument("--cpu-requests", type=int, default=2)
    p.add_argument("--cpu-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prefix-cache-mb", type=float, default=0.0,
                   help="the tiny part's server prefix cache (default 0: off, continuous batching alone; the requests "
                        "cycle 8 images, so with it on most image prefills are skipped in both modes)")
    p.add_argument("--output", help="folder for results.json")
    args = p.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if "tiny" in args.parts:
            result["tiny"] = part_tiny(args, Path(tmp) / "tiny")
        if "cpu" in args.parts:
            result["cpu"] = part_cpu(args, Path(tmp) / "cpu")
    if args.output:
        from pmod.io.atomic import atomic_write_text

        Path(args.output).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output) / "results.json", json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
