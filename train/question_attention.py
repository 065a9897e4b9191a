"""Where the answer position looks: attention of a model's last prompt token on the image and on the question's
object word, per decoder layer and head (the diagnosis behind stage 1b, BENCHMARKS.md).

    python train/question_attention.py pmod/assets/tiny-synth-dense --data runs/embedded-default/data

Over the colour and existence questions of the data's validation split (`val.jsonl`), one image each. A decoder
that never attends to the object word cannot answer a question that names one, whatever it sees.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

import pmod
from pmod.modeling.rope import apply_rope_tables as apply_rope  # the layers get `rope_tables`
from pmod.packing import IMAGE_TOKEN_INDEX
from pmod.tools.synthetic import SHAPES


def last_token_attention(model) -> tuple[list[torch.Tensor], list]:
    """Forward pre-hooks on every layer's attention that store the last token's probabilities [H, N]."""
    probs: list[torch.Tensor] = []

    def hook(attn, args):
        x, cos, sin, _ = args
        n = x.shape[0]
        q = apply_rope(attn.q_proj(x).view(n, attn.H, attn.D), cos, sin)[-1]  # [H, D]
        k = apply_rope(attn.k_proj(x).view(n, attn.G, attn.D), cos, sin).repeat_interleave(attn.H // attn.G, dim=1)
        probs.append((torch.einsum("hd,nhd->hn", q, k) * attn.scale).softmax(-1))

    handles = [layer.self_attn.register_forward_pre_hook(hook) for layer in model.language_model.layers]
    return probs, handles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help="a folder written by pmod.tools.synthetic.write_dataset")
    ap.add_argument("--n", type=int, default=40, help="validation records read (colour and existence ones used)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = pmod.from_pretrained(args.model, dtype=torch.float32, device="cpu").eval()
    proc = pmod.load_processor(args.model)
    if model.config.mod_ratios:
        raise SystemExit("use a dense checkpoint: with MoD layers the last token's keys are a routed subset")
    P = model.config.vision.num_patches
    records = [json.loads(line) for line in (Path(args.data) / "val.jsonl").read_text().splitlines()[: args.n]]
    probs, handles = last_token_attention(model)
    L, H = len(model.language_model.layers), model.config.text.num_attention_heads
    on_image, on_word, n = torch.zeros(L, H), torch.zeros(L, H), 0
    for r in records:
        if r["type"] not in ("color", "exists"):
            continue
        batch = proc(r["question"], [Image.open(Path(args.data) / r["image"])])
        probs.clear()
        with torch.no_grad():
            model(**batch)
        ids = batch["input_ids"][0].tolist()
        at = ids.index(IMAGE_TOKEN_INDEX)
        words = proc.tokenizer.convert_ids_to_tokens(ids[:at]) + [None] * P + proc.tokenizer.convert_ids_to_tokens(ids[at + 1 :])
        word = [j for j, w in enumerate(words) if w in SHAPES]
        for li, p in enumerate(probs):
            on_image[li] += p[:, at : at + P].sum(-1)
            on_word[li] += p[:, word].sum(-1)
        n += 1
    for h in handles:
        h.remove()
    print(f"{args.model}: the answer position's attention over {n} colour / existence questions, per layer (heads):")
    for li in range(L):
        img = " ".join(f"{v:5.1%}" for v in (on_image[li] / n).tolist())
        wrd = " ".join(f"{v:5.1%}" for v in (on_word[li] / n).tolist())
        print(f"  layer {li}: on the image {img} | on the object word {wrd}")
    print(f"max on the object word: {(on_word / n).max():.1%}")


if __name__ == "__main__":
    main()
