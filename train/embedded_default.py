"""Rebuild the embedded default: the tiny p-MoD model (and its dense twin) shipped in pmod/assets/.

    python train/embedded_default.py                  # ~30 min on 2 CPU cores, writes pmod/assets/tiny-synth-{pmod,dense}
    python train/embedded_default.py --vision-steps 10 --align-steps 10 --text-steps 10 --steps 10 --no-install   # a quick check

LLaVA's two stages, on the synthetic task of `pmod.tools.synthetic`, after a stage 0 that stands in for CLIP and with
a stage 1b between them that stands in for the pretrained LLM:

0. Vision pre-training (`train/pretrain_vision.py`, 2 threads): the CLIP-style ViT, from scratch, learns to
   name for every patch the shape, colour and size of the object it lies on (or background). Captions alone
   leave single patches blind to their object's shape (38 % by a linear probe, chance 25 %), and then no
   question that names an object by its shape can find it; after this stage the heads read shape on 93 %
   of object patches.
1. Alignment (dense, both cores: two gloo processes): the tiny LLaVA (that ViT, a fresh LLaMA-style
   decoder, 256 vision tokens per 64 px image) learns to caption scenes ("top left small red circle. ...").
   Everything trains, the ViT at a lower rate that keeps stage 0's patch features.
1b. Language (dense, one process): questions over scenes written in words, no image. LLaVA starts from a
   pretrained LLM that can read a question; this decoder starts from scratch, and captions never teach it
   (each caption word needs only the words before it): after stage 1 the answer position puts at most 0.6 %
   of its attention on the question's object word, and existence stays at chance over images whatever the
   stage-2 data. After this stage the skill carries over to image patches (BENCHMARKS.md).
2. Instruction tuning (one core each, side by side): from the same stage-1b weights, seed, data and step
   budget, at half the rate, a dense model and a p-MoD model with the default schedule learn the
   questions (existence weighted), mixed with some captions (which keep the grounding). Each caption and
   each question conversation is its own sample: a caption in the context would answer the questions
   without the image. p-MoD enters here, as in the paper (its models fine-tune with MoD layers from
   dense weights).

Stage 1 runs at 1e-3: at 2e-3 the tiny decoder never learns to find an object by its attributes.
Deterministic given the seed and the process count. Use one torch thread per process: on a small
shared CPU, more threads oversubscribe and run several times slower.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from pmod import PmodForConditionalGeneration, PmodProcessor
from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig
from pmod.tools.synthetic import corpus, text_conversations, train_tokenizer, write_dataset
from pmod.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "pmod" / "assets"
TWO_PROCS = REPO / "train" / "accelerate" / "cpu-2proc.yaml"
# Question mixes (a repeated type is weighted): existence, the hardest look-up to form, gets the most.
TEXT_TYPES = ("exists", "color", "exists", "shape", "exists", "choice", "exists", "position")  # stage 1b, over words
QA_TYPES = ("exists", "color", "exists", "shape", "exists", "position", "choice", "count")  # stage 2, over images


def tiny_config(vocab_size: int) -> PmodConfig:
    """~1.4 M parameters: 64 px images in 4 px patches (256 vision tokens), a 4-layer ViT, a 6-layer decoder.
    Four kv heads: with two (GQA) the decoder never learnt the existence check even over words (BENCHMARKS.md)."""
    return PmodConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision=VisionConfig(clip={"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4,
                                  "num_attention_heads": 4, "image_size": 64, "patch_size": 4, "hidden_act": "gelu"},
                            select_layer=-1),
        mod=ModConfig(schedule="none"), projector_type="mlp2x_gelu", image_aspect_ratio="square",
        model_max_length=512, conv_template="chat_nosys",
    )


def _launch(cfg: TrainConfig, work: Path, name: str, procs: int, threads: int = 1) -> subprocess.Popen:
    """`python -m pmod.training --config` (under `accelerate launch` for 2 processes), `threads` each, logged to a file."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "pmod.training", "--config", str(path)]
    if procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCS), "--num_processes",
               str(procs), "--main_process_port", str(port), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(work / f"{name}.log", "w") as log:  # the child holds its own descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finished(cfg: TrainConfig) -> bool:
    """A run whose output holds an exported model trained with exactly this config (make-style: not redone)."""
    out = Path(cfg.output)
    if not (out / "model.safetensors").exists() or not (out / "train_config.yaml").exists():
        return False
    return yaml.safe_load((out / "train_config.yaml").read_text()) == yaml.safe_load(yaml.safe_dump(cfg.to_dict()))


def _wait(runs: dict[str, tuple[subprocess.Popen, TrainConfig]], desc: str) -> None:
    """Wait for the runs, one progress bar over all their steps (read from each run's train_log.jsonl)."""
    total = sum(cfg.max_steps for _, cfg in runs.values())
    with tqdm(total=total, desc=desc, unit="step") as bar:
        while True:
            done = 0
            for proc, cfg in runs.values():
                log = Path(cfg.output) / "train_log.jsonl"
                if log.exists():
                    lines = log.read_text().splitlines()
                    done += json.loads(lines[-1])["step"] if lines else 0
            bar.update(done - bar.n)
            if all(p.poll() is not None for p, _ in runs.values()):
                break
            time.sleep(5)
    for name, (proc, cfg) in runs.items():
        if proc.returncode != 0:
            log = Path(cfg.output).parent / f"{name}.log"
            raise RuntimeError(f"training run {name!r} failed (exit {proc.returncode}); last lines of {log}:\n"
                               + "\n".join(log.read_text().splitlines()[-20:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "embedded-default"))
    ap.add_argument("--align-steps", type=int, default=700, help="stage 1 steps (captions, dense, 2 processes)")
    ap.add_argument("--text-steps", type=int, default=1100, help="stage 1b steps (questions over scenes in words; 0: skip)")
    ap.add_argument("--text-batch-size", type=int, default=32)
    ap.add_argument("--n-text", type=int, default=10000, help="text-only conversations for stage 1b")
    ap.add_argument("--steps", type=int, default=520, help="stage 2 steps of each model (side by side)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per step (stage 1: split over the 2 processes)")
    ap.add_argument("--stage2-data", choices=("mixture", "questions"), default="mixture",
                    help="stage 2 on captions + questions, or questions only (learns look-ups, forgets captions)")
    ap.add_argument("--stage2-captions", type=int, default=2000,
                    help="captions kept in the stage-2 mixture (they keep the grounding; the rest of the budget goes to questions)")
    ap.add_argument("--rounds", type=int, default=4, help="questions per image in a stage-2 conversation")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--lr", type=float, default=1e-3, help="stage 1 rate (2e-3 keeps the decoder from learning look-ups)")
    ap.add_argument("--finetune-lr", type=float, default=None, help="stage 2 rate (default: half of --lr)")
    ap.add_argument("--router-lr", type=float, default=1e-4, help="MoD routers (Adam at --lr saturates TanhNorm)")
    ap.add_argument("--vision-steps", type=int, default=600, help="stage 0: ViT on per-patch labels (0: skip)")
    ap.add_argument("--vision-lr", type=float, default=3e-3, help="stage 0 rate")
    ap.add_argument("--vision-tower-lr", type=float, default=2e-4, help="ViT rate in stages 1-2 (keeps stage 0's patch features)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-install", action="store_true", help="leave pmod/assets untouched")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    data = work / "data"
    if not (data / "train.json").exists():
        write_dataset(data, n_train=args.n_train, train_rounds=args.rounds, caption=True, train_types=QA_TYPES)
    mixture = data / f"train_mixture_{args.stage2_captions}.json"  # question conversations, then captions
    if not mixture.exists():
        mixture.write_text(json.dumps(json.loads((data / "train.json").read_text())
                                      + json.loads((data / "train_captions.json").read_text())[: args.stage2_captions]))
    text_data = data / "train_text.json"  # stage 1b: scenes in words, questions weighted to existence
    if not text_data.exists():
        text_data.write_text(json.dumps(text_conversations(args.n_text, types=TEXT_TYPES)))
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(corpus(records))
    torch.manual_seed(args.seed)
    init = PmodForConditionalGeneration(tiny_config(len(tokenizer))).init_weights()
    init.save_pretrained(work / "init")
    PmodProcessor(tokenizer, init.config).save_pretrained(work / "init")
    print(f"data + tokenizer ({len(tokenizer)} words) + init: {time.perf_counter() - t0:.0f} s")

    start = work / "init"
    if args.vision_steps:  # stage 0, in its own folder per step count so that stage 1 sees a changed start
        start = work / f"vit-{args.vision_steps}-{args.vision_lr:g}"
        if not (start / "model.safetensors").exists():
            tmp = work / "vit-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(work / "init", tmp)
            subprocess.run([sys.executable, str(REPO / "train" / "pretrain_vision.py"), "--model", str(tmp), "--data", str(data),
                            "--steps", str(args.vision_steps), "--lr", str(args.vision_lr), "--seed", str(args.seed),
                            "--threads", "2"], check=True)
            tmp.rename(start)
        else:
            print(f"stage 0: {start} already holds this run; kept")

    base = TrainConfig(
        model=str(start), data=str(data / "train_captions.json"), image_folder=str(data), stage="finetune",
        template="chat_nosys", train_vision_tower=True, per_device_batch_size=args.batch_size // 2,
        max_steps=args.align_steps, learning_rate=args.lr, warmup_ratio=0.03, lr_scheduler="cosine", weight_decay=0.0,
        vision_tower_lr=args.vision_tower_lr if args.vision_steps else None,
        seed=args.seed, save_steps=max(args.align_steps // 2, 1), save_total_limit=1, logging_steps=10,
        group_by_modality_length=False, check_images=False, output=str(work / "align"), mod={"schedule": "none"},
    )
    t = time.perf_counter()
    if _finished(base):
        print(f"stage 1: {base.output} already holds this run; kept (delete it to retrain)")
    else:
        _wait({"align": (_launch(base, work, "align", procs=2), base)}, "stage 1: captions (dense, 2 processes)")
        print(f"stage 1: {args.align_steps} steps in {(time.perf_counter() - t) / 60:.1f} min")

    start = work / "align"
    if args.text_steps:  # stage 1b: the decoder learns to read a question and find what it names, over words
        lang = base.replace(model=str(start), data=str(text_data), per_device_batch_size=args.text_batch_size,
                            max_steps=args.text_steps, save_steps=max(args.text_steps // 2, 1), output=str(work / "language"))
        t = time.perf_counter()
        if _finished(lang):
            print(f"stage 1b: {lang.output} already holds this run; kept")
        else:
            _wait({"language": (_launch(lang, work, "language", procs=1, threads=2), lang)}, "stage 1b: questions over text (dense)")
            print(f"stage 1b: {args.text_steps} steps in {(time.perf_counter() - t) / 60:.1f} min")
        start = work / "language"

    runs = {}
    for name, schedule in (("dense", "none"), ("pmod", "shiftedcos")):
        cfg = base.replace(model=str(start), data=str(mixture if args.stage2_data == "mixture" else data / "train.json"), learning_rate=args.finetune_lr or args.lr / 2, per_device_batch_size=args.batch_size,
                           max_steps=args.steps, save_steps=max(args.steps // 2, 1), output=str(work / name),
                           mod={"schedule": schedule}, router_lr=args.router_lr if schedule != "none" else None)
        runs[name] = (_launch(cfg, work, name, procs=1), cfg)
    t = time.perf_counter()
    _wait(runs, "stage 2: dense | p-MoD (side by side)")
    print(f"stage 2: {args.steps} steps each in {(time.perf_counter() - t) / 60:.1f} min")

    if not args.no_install:
        for name in runs:
            dest = ASSETS / f"tiny-synth-{name}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(work / name, dest, ignore=shutil.ignore_patterns("checkpoints", "skipped_samples.json"))
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min" + ("" if args.no_install else f"; checkpoints in {ASSETS}"))


if __name__ == "__main__":
    main()
