"""A synthetic visual question-answering task, deterministic by seed: coloured shapes on clutter.

Each scene puts 1-4 objects (shape, colour, size) into distinct cells of a 2x2 grid over a cluttered
background (noise texture, grey strokes and specks that are not objects). Questions need one or a
few image regions: the colour or shape of an object, counting, position, existence (POPE-style
yes/no, balanced) and multiple choice (four colours listed, answered with one of them). Objects cover a
minority of the image, so a good router can drop background patches; each sample records its object
boxes to measure that.

Writes the LLaVA conversation JSON used by training (`{split}.json`) and the flat JSON lines used by
evaluation (`{split}.jsonl`: id, image, question, answer, type), images under `images/`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "CELLS", "DESCRIBE", "QUESTION_TYPES", "Scene", "make_scene", "render", "make_sample", "write_split", "write_dataset",
           "object_patch_mask", "patch_labels", "train_tokenizer", "corpus", "describe", "parse_caption",
           "ask", "text_conversations"]

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "position", "exists", "choice")
SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_003, "text": 3_000_003}


@dataclass
class Obj:
    shape: str
    color: str
    size: str  # "small" or "large"
    cell: int  # index into CELLS
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass
class Scene:
    size: int
    objects: list[Obj]
    seed: int


def make_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    n = int(rng.integers(1, 5))
    cells = rng.permutation(4)[:n]
    objs, half = [], size // 2
    for cell in cells:
        big = bool(rng.random() < 0.5)
        side = int(half * (0.84 if big else 0.60))
        cx0, cy0 = int(cell % 2) * half, int(cell // 2) * half
        x0 = int(cx0 + rng.integers(2, half - side - 1))
        y0 = int(cy0 + rng.integers(2, half - side - 1))
        objs.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), "large" if big else "small", int(cell),  # noqa: E501
                        (x0, y0, x0 + side, y0 + side)))
    return Scene(size, objs, int(rng.integers(2**31)))


def render(scene: Scene) -> Image.Image:
    rng = np.random.default_rng(scene.seed)
    s = scene.size
    base = rng.integers(90, 165, size=3)
    noise = rng.normal(0, 14, size=(s, s, 3)) + base  # low-contrast texture
    img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):  # clutter: grey strokes and specks
        g = int(rng.integers(60, 200))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, s, 4))
        d.line((x0, y0, x1, y1), fill=(g, g, g), width=1)
    for _ in range(int(rng.integers(4, 10))):
        x, y = (int(v) for v in rng.integers(0, s, 2))
        g = int(rng.integers(40, 220))
        d.point((x, y), fill=(g, g, g))
    for o in scene.objects:
        _draw(d, o)
    return img


def _draw(d: ImageDraw.ImageDraw, o: Obj, fill=None) -> None:
    x0, y0, x1, y1 = o.box
    c = COLORS[o.color] if fill is None else fill
    if o.shape == "circle":
        d.ellipse(o.box, fill=c)
    elif o.shape == "square":
        d.rectangle(o.box, fill=c)
    elif o.shape == "triangle":
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=c)
    else:  # cross
        w = max((x1 - x0) // 3, 1)
        d.rectangle((x0, (y0 + y1) // 2 - w // 2, x1, (y0 + y1) // 2 + w // 2), fill=c)
        d.rectangle(((x0 + x1) // 2 - w // 2, y0, (x0 + x1) // 2 + w // 2, y1), fill=c)


def _unique(objs: list[Obj], attr: str) -> list[Obj]:
    vals = [getattr(o, attr) for o in objs]
    return [o for o in objs if vals.count(getattr(o, attr)) == 1]


def make_sample(scene: Scene, rng: np.random.Generator, qtype: str) -> tuple[str, str, str]:
    """(question, answer, type) of `qtype`, answerable from the scene; a count question if `qtype` is impossible."""
    objs = scene.objects
    if qtype == "color" and _unique(objs, "shape"):
        o = _unique(objs, "shape")[int(rng.integers(len(_unique(objs, "shape"))))]
        return f"What color is the {o.shape}? Answer with one word.", o.color, qtype
    if qtype == "shape" and _unique(objs, "color"):
        o = _unique(objs, "color")[int(rng.integers(len(_unique(objs, "color"))))]
        return f"What shape is the {o.color} object? Answer with one word.", o.shape, qtype
    if qtype == "position":
        o = objs[int(rng.integers(len(objs)))]
        same = [p for p in objs if (p.color, p.shape) == (o.color, o.shape)]
        if len(same) == 1:
            return f"Where is the {o.color} {o.shape}? Answer top left, top right, bottom left or bottom right.", CELLS[o.cell], qtype
    if qtype == "exists":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, sh = sorted(present)[int(rng.integers(len(present)))]
            return f"Is there a {c} {sh} in the image? Answer yes or no.", "yes", qtype
        absent = [(c, sh) for c in COLORS for sh in SHAPES if (c, sh) not in present]
        c, sh = absent[int(rng.integers(len(absent)))]
        return f"Is there a {c} {sh} in the image? Answer yes or no.", "no", qtype
    if qtype == "choice" and _unique(objs, "shape"):
        o = _unique(objs, "shape")[int(rng.integers(len(_unique(objs, "shape"))))]
        others = [c for c in COLORS if c != o.color]
        opts = [o.color] + [others[i] for i in rng.permutation(len(others))[:3]]
        opts = [opts[i] for i in rng.permutation(4)]
        # GQA's "choose" form (the answer is one of the listed options). A lettered list needs an induction-style
        # copy that the tiny decoder trained from scratch does not form within the embedded budget (BENCHMARKS.md).
        return f"Is the {o.shape} {', '.join(opts[:3])} or {opts[3]}? Answer with one word.", o.color, qtype
    return "How many objects are there? Answer with one word.", NUMBERS[len(objs)], "count"


DESCRIBE = "Describe the objects."


def describe(scene: Scene) -> str:
    """A caption naming every object by cell, e.g. "top left large red circle. bottom right small blue cross."
    (LLaVA's stage-1 alignment data for this task: dense supervision of what is where)."""
    return " ".join(f"{CELLS[o.cell]} {o.size} {o.color} {o.shape}." for o in sorted(scene.objects, key=lambda o: o.cell))


def parse_caption(text: str) -> dict[str, tuple[str, str, str]]:
    """The inverse of `describe` on a (generated) caption: {cell: (size, colour, shape)}; malformed parts are skipped."""
    out = {}
    for part in text.lower().split("."):
        w = part.split()
        if len(w) == 5 and " ".join(w[:2]) in CELLS:
            out[" ".join(w[:2])] = (w[2], w[3], w[4])
    return out


def ask(scene: Scene, rng: np.random.Generator, rounds: int, types: tuple[str, ...] = QUESTION_TYPES,
        start: int = 0) -> list[tuple[str, str, str]]:
    """`rounds` (question, answer, type) about `scene`, types cycled from `types[start]` (repeat a type to
    weight it; `make_sample` falls back to counting where a type is impossible)."""
    return [make_sample(scene, rng, types[(start + j) % len(types)]) for j in range(rounds)]


def write_split(root: str | Path, split: str, n: int, image_size: int = 64, seed: int | None = None,
                rounds: int = 1, caption: bool = False, types: tuple[str, ...] = QUESTION_TYPES) -> list[dict]:
    """Write `n` images of `split` under `root`, each with `rounds` questions (`ask`: `types` cycled, so a
    multi-round conversation asks about the same image several ways); returns one flat record per
    question. With `caption`, also `{split}_captions.json`: one DESCRIBE -> caption conversation per
    image (LLaVA's stage-1 alignment data; kept out of the question conversations, where a caption
    in context would let the model answer from the text instead of the image). Deterministic in
    (split, n, seed, rounds, types); images depend on neither `caption` nor `types`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    base = SPLIT_SEEDS[split] if seed is None else seed
    records, convs, captions = [], [], []
    for i in range(n):
        rng = np.random.default_rng(base + i)
        scene = make_scene(rng, image_size)
        name = f"images/{split}_{i:06d}.png"
        render(scene).save(root / name)
        if caption:
            captions.append({"id": f"{split}_{i:06d}_caption", "image": name, "conversations": [
                {"from": "human", "value": "<image>\n" + DESCRIBE}, {"from": "gpt", "value": describe(scene)}]})
        turns = []
        for j, (question, answer, qtype) in enumerate(ask(scene, rng, rounds, types, start=i)):
            rid = f"{split}_{i:06d}" + (f"_{j}" if rounds > 1 else "")
            records.append({"id": rid, "image": name, "question": question, "answer": answer, "type": qtype,
                            "objects": [asdict(o) for o in scene.objects]})
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        if turns:
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
            convs.append({"id": f"{split}_{i:06d}", "image": name, "conversations": turns})
    (root / f"{split}.json").write_text(json.dumps(convs))
    if caption:
        (root / f"{split}_captions.json").write_text(json.dumps(captions))
    with open(root / f"{split}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def text_conversations(n: int, seed: int | None = None, rounds: int = 4, types: tuple[str, ...] = QUESTION_TYPES) -> list[dict]:
    """`n` text-only conversations: a fresh scene written out in words (`describe`), then `rounds` questions
    about it (types cycled). Language data for the decoder: reading a question and finding what it names in
    the context is the skill a pretrained LLM brings to LLaVA and a decoder trained from scratch lacks."""
    base = SPLIT_SEEDS["text"] if seed is None else seed
    convs = []
    for i in range(n):
        rng = np.random.default_rng(base + i)
        scene = make_scene(rng)
        turns = []
        for question, answer, _ in ask(scene, rng, rounds, types, start=i):
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        turns[0]["value"] = describe(scene) + "\n" + turns[0]["value"]
        convs.append({"id": f"text_{i:06d}", "conversations": turns})
    return convs


def write_dataset(root: str | Path, n_train: int = 8000, n_val: int = 300, n_test: int = 600, image_size: int = 64,
                  train_rounds: int = 6, caption: bool = True, train_types: tuple[str, ...] = QUESTION_TYPES) -> Path:
    """Train images carry `train_rounds` questions each, as one conversation (and, with `caption`, a
    caption each in `train_captions.json`); val and test one question each."""
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        train = split == "train"
        write_split(root, split, n, image_size, rounds=train_rounds if train else 1, caption=caption and train,
                    types=train_types if train else QUESTION_TYPES)
    return Path(root)


def object_patch_mask(objects: list[dict], image_size: int, patch: int) -> np.ndarray:
    """[(S/p)^2] bool: patches whose area overlaps an object box (row-major, as the vision tokens)."""
    g = image_size // patch
    mask = np.zeros((g, g), dtype=bool)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        mask[y0 // patch : math.ceil((y1 + 1) / patch), x0 // patch : math.ceil((x1 + 1) / patch)] = True
    return mask.reshape(-1)


def patch_labels(objects: list[dict], image_size: int, patch: int, min_cover: float = 0.25) -> dict[str, np.ndarray]:
    """Per patch (row-major, as the vision tokens), what it shows: {"shape", "color", "size"} -> [(S/p)^2] int64,
    0 for background, else 1 + the index in SHAPES / COLORS / ("small", "large"). A patch belongs to the object
    drawing at least `min_cover` of its pixels (objects sit in distinct cells and never overlap)."""
    g = image_size // patch
    out = {k: np.zeros(g * g, dtype=np.int64) for k in ("shape", "color", "size")}
    for o in objects:
        mask = Image.new("L", (image_size, image_size), 0)
        _draw(ImageDraw.Draw(mask), Obj(**{**o, "box": tuple(o["box"])}), fill=255)
        cover = (np.asarray(mask) > 0).reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1)
        on = cover >= min_cover
        out["shape"][on] = 1 + SHAPES.index(o["shape"])
        out["color"][on] = 1 + list(COLORS).index(o["color"])
        out["size"][on] = 1 + ("small", "large").index(o["size"])
    return out


def train_tokenizer(texts: list[str], folder: str | Path | None = None):
    """A word-level tokenizer trained on `texts` with the `tokenizers` library, wrapped for transformers.

    Specials: <pad> 0, <s> 1 (prepended), </s> 2, <unk> 3. Words split on whitespace and punctuation;
    "<image>" is never a token (the processor puts -200 there).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if folder is not None:
        fast.save_pretrained(str(folder))
    return fast


def corpus(records: list[dict]) -> list[str]:
    """Every text the model will see: questions, answers and the chat markers of its template."""
    return [r["question"] for r in records] + [r["answer"] for r in records] + ["USER: ASSISTANT: </s>", DESCRIBE, "small large"]
