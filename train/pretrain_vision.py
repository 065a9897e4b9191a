"""Stage 0 of the embedded default: pre-train the tiny ViT to say, for every patch, what object it shows.

    python train/pretrain_vision.py --model runs/embedded-default/init --data runs/embedded-default/data

LLaVA starts from CLIP, whose patch features already name what they show. A ViT trained from scratch on
captions alone does not get there: a caption can be read off a whole cell, so single patches end up knowing
their colour (a linear probe reads it from 87 % of object patches) but not the shape of the object they belong
to (38 %, chance 25 %). Questions that name an object by its shape ("What color is the circle?", "Is there
a red circle?") then have nothing to match in the decoder's attention. This stage gives the patches that
knowledge: per-patch shape / colour / size of the covering object or background (`pmod.tools.synthetic.patch_labels`),
three linear heads on the tower's selected layer, cross-entropy, then the heads are dropped. Writes the
tower back into the model folder.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pmod import PmodForConditionalGeneration, load_processor
from pmod.tools.synthetic import COLORS, SHAPES, patch_labels
from pmod.training.schedule import build_scheduler

HEADS = {"shape": 1 + len(SHAPES), "color": 1 + len(COLORS), "size": 3}  # classes, background = 0


def load_images(records: list[dict], root: Path, processor, image_size: int, patch: int) -> tuple[torch.Tensor, dict]:
    """One entry per distinct image: pixels [N, 3, S, S] and per-patch labels {head: [N, P]}."""
    seen = {}
    for r in records:
        seen.setdefault(r["image"], r["objects"])
    names = list(seen)
    pixels = torch.cat([processor.process_images([root / n for n in names[i : i + 256]])[0]
                        for i in tqdm(range(0, len(names), 256), desc="stage 0: images", unit="batch", leave=False)])
    labels = [patch_labels(seen[n], image_size, patch) for n in names]
    return pixels, {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in HEADS}


def pretrain_vision(model: PmodForConditionalGeneration, pixels: torch.Tensor, labels: dict[str, torch.Tensor],
                    steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> tuple[list[float], dict[str, float]]:
    """Train model.vision_tower in place on per-patch labels (AdamW, cosine decay). Returns the loss per step
    and each head's accuracy on object patches over the last 10 % of steps (what the decoder can match on)."""
    tower = model.vision_tower
    width = tower(pixels[:1]).shape[-1]
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in HEADS.items()})
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = build_scheduler(opt, "cosine", steps, warmup_ratio=0.05)  # the training loop's warm-up + cosine
    gen = torch.Generator().manual_seed(seed)
    losses, hits = [], {k: [] for k in HEADS}
    tower.train()
    for _ in (bar := tqdm(range(steps), desc="stage 0: ViT on patch labels", unit="step")):
        idx = torch.randint(len(pixels), (batch_size,), generator=gen)
        feats = tower(pixels[idx])  # [B, P, Cv]
        logits = {k: head(feats).flatten(0, 1) for k, head in heads.items()}  # [B*P, classes]
        loss = sum(F.cross_entropy(logits[k], labels[k][idx].flatten()) for k in heads)
        if len(losses) >= steps - max(steps // 10, 1):
            on = labels["shape"][idx].flatten() > 0
            for k in heads:
                hits[k].append((logits[k].argmax(-1) == labels[k][idx].flatten())[on].float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    tower.eval()
    return losses, {k: sum(v) / len(v) for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (pmod format); its vision tower is replaced")
    ap.add_argument("--data", required=True, help="synthetic data root holding train.jsonl and images/")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = PmodForConditionalGeneration.from_pretrained(args.model)
    processor = load_processor(args.model)
    data = Path(args.data)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    v = model.config.vision
    pixels, labels = load_images(records, data, processor, v.image_size, v.patch_size)
    losses, acc = pretrain_vision(model, pixels, labels, args.steps, args.batch_size, args.lr, args.seed)
    model.save_pretrained(args.model)
    print(f"stage 0: {args.steps} steps, loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}; on object patches "
          + ", ".join(f"{k} {100 * v:.0f} %" for k, v in acc.items()) + f"; "
          f"{(time.perf_counter() - t) / 60:.1f} min; tower written to {args.model}")


if __name__ == "__main__":
    main()
