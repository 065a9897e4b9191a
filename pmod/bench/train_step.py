"""Training step time, p-MoD against its dense twin, at a scaled LLaVA-1.5 shape.

    python -m pmod.bench.train_step                     # CPU default: 8 layers x 384 wide, 576 vision tokens
    python -m pmod.bench.train_step --device cuda --dtype bfloat16 --layers 32 --hidden 2048 --intermediate 5504 --batch 8

Both models share every weight; the dense twin has no MoD layer. A step is what the fine-tuning stage
runs: forward with labels, backward, AdamW step, over the LLM, projector and routers (vision tower
frozen). The two models alternate step by step, so that a noisy machine slows both alike; the median
and the fastest step are reported (on a shared CPU the fastest is the steadier estimate). The paper's figure is 77.7 % of the dense GPU hours for a full LLaVA-NeXT fine-tune
(with 24 of 32 layers routed); here the schedule keeps the same shape over `--layers`. The last line
is JSON. The same step on a bench preset's shapes is the `train_step` section of `pmod bench` (an extra:
`pmod bench --sections train_step`), timed by the bench's interleaved repetitions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig
from pmod.packing import IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = ["bench_config", "make_batch", "measure", "main", "step_seconds", "trainable_pair"]


def bench_config(args: argparse.Namespace, dense: bool) -> PmodConfig:
    text = TextConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=4096)
    vision = VisionConfig(clip={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                               "image_size": args.image_size, "patch_size": 14, "hidden_act": "quick_gelu"})
    return PmodConfig(text=text, vision=vision, mod=ModConfig(schedule="none") if dense else ModConfig(), model_max_length=4096)


def make_batch(cfg: PmodConfig, batch: int, n_text: int, seed: int = 0) -> dict:
    """Rows of [BOS, 8 prompt tokens, <image>, the rest of n_text]: the answer part is supervised."""
    g = torch.Generator().manual_seed(seed)
    S, V = cfg.vision.image_size, cfg.text.vocab_size
    ids = torch.randint(3, V, (batch, n_text + 1), generator=g)  # [B, T]
    ids[:, 0] = 1
    ids[:, 9] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, :10] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "images": torch.randn(batch, 3, S, S, generator=g)}


def step_seconds(model, opt, batch: dict, device: torch.device) -> float:
    """One training step (forward with labels, backward, AdamW), synchronised: its wall time in seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = model(**{k: v.to(device) if k == "images" else v for k, v in batch.items()}, logits_to_keep="none", output_routing=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def trainable_pair(configs: dict[str, PmodConfig], device: torch.device, dtype: torch.dtype, seed: int,
                   grad_ckpt: bool = False) -> tuple[dict, dict]:
    """({name: model}, {name: AdamW}): the models of `configs` from one seed (the same weights where their
    shapes agree), vision tower frozen, as the fine-tuning stage trains them."""
    from pmod.modeling.llava import PmodForConditionalGeneration

    models, opts = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        m = PmodForConditionalGeneration(cfg).init_weights().to(device=device, dtype=dtype).train()
        m.vision_tower.requires_grad_(False)
        if grad_ckpt:
            m.gradient_checkpointing_enable()
        models[name] = m
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    return models, opts


def measure(args: argparse.Namespace) -> dict:
    from pmod.flops import count_flops

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    configs = {"dense": bench_config(args, True), "p-MoD": bench_config(args, False)}
    models, opts = trainable_pair(configs, device, dtype, args.seed, args.grad_ckpt)
    batch = make_batch(models["dense"].config, args.batch, args.n_text, args.seed)
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(args.warmup + args.steps):
        for name, model in models.items():
            dt = step_seconds(model, opts[name], batch, device)
            if i >= args.warmup:
                times[name].append(dt)
    n_vision = models["dense"].config.vision.num_patches
    tokens = args.batch * (args.n_text + n_vision)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts), "tokens_per_s": tokens / med}
    fl = count_flops(models["p-MoD"].config, n_vision=n_vision, n_text=args.n_text, convention="complete")
    return {
        "bench": "train_step", "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "shape": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                  "vocab": args.vocab, "n_vision": n_vision, "n_text": args.n_text, "batch": args.batch,
                  "mod_layers": len(models["p-MoD"].config.mod_ratios), "grad_ckpt": args.grad_ckpt},
        "steps": args.steps, "dense": rows["dense"], "pmod": rows["p-MoD"],
        "time_ratio": rows["p-MoD"]["median_ms"] / rows["dense"]["median_ms"],
        "time_ratio_min": rows["p-MoD"]["min_ms"] / rows["dense"]["min_ms"],
        "prefill_flops_ratio": fl.total / fl.dense_total, "paper_gpu_hours_ratio": 0.777,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmod.bench.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--image-size", type=int, default=336, help="336 px / 14 = 576 vision tokens, as LLaVA-1.5")
    p.add_argument("--n-text", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args)
    print(f"training step, {r['shape']['layers']} layers x {r['shape']['hidden']} ({r['shape']['mod_layers']} MoD), "
          f"{r['shape']['n_vision']} vision + {r['shape']['n_text']} text tokens x {r['shape']['batch']} rows, "
          f"{r['device']} {r['dtype']}, {r['threads']} thread(s), median of {r['steps']}")
    print(f"{'model':8} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'tokens/s':>10}")
    for name, row in (("dense", r["dense"]), ("p-MoD", r["pmod"])):
        print(f"{name:8} {row['median_ms']:10.1f} {row['min_ms']:9.1f} {row['max_ms']:9.1f} {row['tokens_per_s']:10.0f}")
    print(f"p-MoD / dense step time: {100 * r['time_ratio']:.1f} % of the median, {100 * r['time_ratio_min']:.1f} % of the fastest "
          f"step (prefill FLOPs ratio {100 * r['prefill_flops_ratio']:.1f} %; paper: 77.7 % of GPU hours)")
    print(json.dumps(r))
    return 0



if __name__ == "__main__":
    sys.exit(main())
