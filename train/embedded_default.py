"""Rebuild the embedded default: the tiny p-MoD model (and its dense twin) shipped in pmod/assets/.

    python train/embedded_default.py                  # ~30 min on 2 CPU cores, writes pmod/assets/tiny-synth-{pmod,dense}
    python train/embedded_default.py --steps 20       # a quick check of the whole path

Steps: write the synthetic VQA data (train: several questions per image as one conversation), train a
word-level tokenizer on it, build one randomly initialised tiny LLaVA (CLIP-style ViT from scratch,
LLaMA-style decoder, 256 vision tokens per 64 px image), then train it twice with `pmod.training`
from the same start, seed and step budget: once dense, once with the default p-MoD schedule. The
vision tower is trained too (it starts from scratch). Deterministic given the seed.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from pmod import PmodForConditionalGeneration, PmodProcessor
from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig
from pmod.synthetic import corpus, write_dataset
from pmod.training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "pmod" / "assets"


def tiny_config(vocab_size: int) -> PmodConfig:
    """~1 M parameters: 64 px images in 4 px patches (256 vision tokens), a 3-layer ViT, a 6-layer decoder."""
    return PmodConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision=VisionConfig(clip=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                      image_size=64, patch_size=4, hidden_act="gelu"), select_layer=-1),
        mod=ModConfig(schedule="none"), projector_type="mlp2x_gelu", image_aspect_ratio="square",
        model_max_length=512, conv_template="chat_nosys",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "embedded-default"))
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch-size", type=int, default=16, help="images per step (each with --rounds questions)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-install", action="store_true", help="leave pmod/assets untouched")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)

    t0 = time.perf_counter()
    data = work / "data"
    if not (data / "train.json").exists():
        write_dataset(data, n_train=args.n_train, train_rounds=args.rounds)
    import json

    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    from pmod.synthetic import train_tokenizer

    tokenizer = train_tokenizer(corpus(records))
    torch.manual_seed(args.seed)
    init = PmodForConditionalGeneration(tiny_config(len(tokenizer))).init_weights()
    init.save_pretrained(work / "init")
    PmodProcessor(tokenizer, init.config).save_pretrained(work / "init")
    print(f"data + tokenizer ({len(tokenizer)} words) + init: {time.perf_counter() - t0:.0f} s")

    base = TrainConfig(
        model=str(work / "init"), data=str(data / "train.json"), image_folder=str(data), stage="finetune",
        template="chat_nosys", train_vision_tower=True, per_device_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, warmup_ratio=0.05, lr_scheduler="cosine", weight_decay=0.0, seed=args.seed,
        save_steps=max(args.steps // 2, 1), save_total_limit=1, logging_steps=25, group_by_modality_length=False,
        check_images=False,
    )
    timings = {}
    for name, mod in (("dense", {"schedule": "none"}), ("pmod", {"schedule": "shiftedcos"})):
        t = time.perf_counter()
        result = train(base.replace(output=str(work / name), mod=mod))
        timings[name] = time.perf_counter() - t
        print(f"{name}: {args.steps} steps in {timings[name] / 60:.1f} min, last loss {result.loss}")
        if not args.no_install:
            dest = ASSETS / f"tiny-synth-{name}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(result.exported, dest, ignore=shutil.ignore_patterns("checkpoints", "skipped_samples.json"))
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; checkpoints in {ASSETS}" if not args.no_install else "")


if __name__ == "__main__":
    main()
