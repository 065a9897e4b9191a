"""The synthetic VQA generator: deterministic, answerable, balanced enough to measure accuracy."""
from __future__ import annotations

import collections
import json

import numpy as np

from pmod.tools.synthetic import (
    CELLS,
    COLORS,
    DESCRIBE,
    QUESTION_TYPES,
    SHAPES,
    describe,
    make_scene,
    object_patch_mask,
    parse_caption,
    patch_labels,
    write_split,
)


def test_deterministic_and_both_formats(tmp_path):
    a = write_split(tmp_path / "a", "val", 30)
    b = write_split(tmp_path / "b", "val", 30)
    assert a == b
    assert (tmp_path / "a" / "images" / "val_000007.png").read_bytes() == (tmp_path / "b" / "images" / "val_000007.png").read_bytes()
    conv = json.loads((tmp_path / "a" / "val.json").read_text())
    assert conv[3]["conversations"][0]["value"] == "<image>\n" + a[3]["question"]
    assert conv[3]["conversations"][1] == {"from": "gpt", "value": a[3]["answer"]}
    lines = (tmp_path / "a" / "val.jsonl").read_text().splitlines()
    assert json.loads(lines[5])["id"] == a[5]["id"]


def test_answers_follow_from_the_scene(tmp_path):
    recs = write_split(tmp_path, "test", 240)
    types = collections.Counter(r["type"] for r in recs)
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) >= 20
    for r in recs:
        objs = r["objects"]
        q, ans = r["question"], r["answer"]
        if r["type"] == "count":
            assert ans == ["zero", "one", "two", "three", "four"][len(objs)]
        elif r["type"] == "color":
            shape = q.split("the ")[1].split("?")[0]
            assert [o["color"] for o in objs if o["shape"] == shape] == [ans]
        elif r["type"] == "shape":
            color = q.split("the ")[1].split(" object")[0]
            assert [o["shape"] for o in objs if o["color"] == color] == [ans]
        elif r["type"] == "exists":
            color, shape = q.split("Is there a ")[1].split(" in")[0].split(" ")
            assert (ans == "yes") == any((o["color"], o["shape"]) == (color, shape) for o in objs)
        assert ans in {*COLORS, *SHAPES, "yes", "no", "A", "B", "C", "D", "one", "two", "three", "four",
                       "top left", "top right", "bottom left", "bottom right"}
    exists = [r["answer"] for r in recs if r["type"] == "exists"]
    assert 0.3 < exists.count("yes") / len(exists) < 0.7


def test_object_patch_mask_covers_boxes():
    m = object_patch_mask([{"box": (0, 0, 7, 3)}, {"box": (60, 60, 63, 63)}], 64, 4)
    grid = m.reshape(16, 16)
    assert grid[0, :2].all() and not grid[1, 0] and grid[15, 15] and grid.sum() == 3
    assert np.isclose(m.mean(), 3 / 256)


def test_captions_name_every_object_and_stay_out_of_the_questions(tmp_path):
    recs = write_split(tmp_path, "train", 12, rounds=3, caption=True)
    convs = json.loads((tmp_path / "train.json").read_text())
    caps = json.loads((tmp_path / "train_captions.json").read_text())
    assert len(caps) == len(convs) == 12 and len(recs) == 36
    for conv, cap in zip(convs, caps):
        assert cap["image"] == conv["image"]
        assert cap["conversations"][0]["value"] == "<image>\n" + DESCRIBE
        assert all(t["value"] != DESCRIBE for t in conv["conversations"])  # questions only, image in the first turn
        assert conv["conversations"][0]["value"].startswith("<image>\n") and len(conv["conversations"]) == 6
        objs = next(r for r in recs if r["image"] == conv["image"])["objects"]
        said = [s.strip() for s in cap["conversations"][1]["value"].split(".") if s.strip()]
        want = [f"{CELLS[o['cell']]} {o['size']} {o['color']} {o['shape']}" for o in sorted(objs, key=lambda o: o["cell"])]
        assert said == want
    # the images do not depend on whether captions are written
    plain = write_split(tmp_path / "plain", "train", 12, rounds=3)
    assert plain == recs
    assert (tmp_path / "plain" / "images" / "train_000004.png").read_bytes() == (tmp_path / "images" / "train_000004.png").read_bytes()


def test_parse_caption_inverts_describe_and_skips_malformed_parts():
    for seed in range(20):
        scene = make_scene(np.random.default_rng(seed))
        want = {CELLS[o.cell]: (o.size, o.color, o.shape) for o in scene.objects}
        assert parse_caption(describe(scene)) == want
    assert parse_caption("top left large red circle. middle small blue cross. top right red. ") == {
        "top left": ("large", "red", "circle")}


def test_patch_labels_mark_the_pixels_each_object_draws():
    from dataclasses import asdict

    for seed in range(10):
        scene = make_scene(np.random.default_rng(seed))
        objs = [asdict(o) for o in scene.objects]
        lab = patch_labels(objs, 64, 4)
        assert set(lab) == {"shape", "color", "size"} and all(v.shape == (256,) for v in lab.values())
        on = lab["shape"] > 0
        assert np.array_equal(on, lab["color"] > 0) and np.array_equal(on, lab["size"] > 0)
        assert not (on & ~object_patch_mask(objs, 64, 4)).any()  # only inside the boxes
        for o in objs:  # each object labels its own patches with its own attributes
            own = object_patch_mask([o], 64, 4) & on
            assert own.sum() >= 4
            assert set(lab["shape"][own]) == {1 + SHAPES.index(o["shape"])}
            assert set(lab["color"][own]) == {1 + list(COLORS).index(o["color"])}
    # a square fills its box: every patch fully inside is labelled, min_cover=1 keeps only those
    sq = {"shape": "square", "color": "red", "size": "large", "cell": 0, "box": (4, 4, 19, 19)}
    assert patch_labels([sq], 64, 4, min_cover=1.0)["shape"].reshape(16, 16)[1:5, 1:5].all()


def test_text_conversations_put_the_scene_in_words_before_the_questions():
    from pmod.tools.synthetic import parse_caption, text_conversations

    convs = text_conversations(20, seed=5, rounds=3, types=("exists", "color"))
    assert convs == text_conversations(20, seed=5, rounds=3, types=("exists", "color"))  # deterministic
    assert convs != text_conversations(20, seed=6, rounds=3, types=("exists", "color"))
    for c in convs:
        turns = c["conversations"]
        assert "image" not in c and len(turns) == 6 and "<image>" not in json.dumps(turns)
        scene_text, question = turns[0]["value"].split("\n")
        objects = parse_caption(scene_text)
        assert objects and question.startswith(("Is there a ", "What color", "How many"))  # count: colour impossible
        if question.startswith("Is there a "):  # the answer follows from the scene written above it
            colour, shape = question[len("Is there a "):].split(" in the image")[0].split()
            present = any(o[1:] == (colour, shape) for o in objects.values())
            assert turns[1]["value"] == ("yes" if present else "no")
