"""Training data: label masking per template, truncation, broken-sample reports, collation, grouping, schedules."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer
from test_training_toys import write_data

from pmod.multimodal.processor import PmodProcessor
from pmod.multimodal.templates import get_template, segments
from pmod.packing import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from pmod.training.data import Collator, ConversationDataset
from pmod.training.labels import Tokenized, count_targets, tokenize_segments, truncate
from pmod.training.records import read_records
from pmod.training.sampler import BatchStream, global_batches, rank_slice



CHAT = [{"role": "user", "content": "<image>\nwhat color is this ?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "is this red ?"}, {"role": "assistant", "content": "yes"}]


def trained_text(tok, enc: Tokenized) -> list[str]:
    return tok.convert_ids_to_tokens([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_vicuna_masks_everything_but_the_answers_and_their_separator():
    tok = tiny_tokenizer()
    enc = tokenize_segments(tok, segments("vicuna_v1", CHAT))
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert trained_text(tok, enc) == ["red", "</s>", "yes", "</s>"]
    # the processor (inference) encodes the same prompt to the same ids: training and serving agree
    proc = PmodProcessor(tok, tiny_config(), template="vicuna_v1")
    prompt = proc.apply_template(CHAT[:1])
    assert enc.input_ids[: len(proc.encode(prompt))] == proc.encode(prompt)
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: len(proc.encode(prompt))])
    assert count_targets(enc.labels) == 4


@pytest.mark.parametrize("template", ["chatml", "llama3", "chat_nosys"])
def test_chat_templates_train_exactly_the_assistant_segments(template):
    tok = tiny_tokenizer()
    segs = segments(template, CHAT)
    enc = tokenize_segments(tok, segs)
    expected = sum(len(tok(text.replace("<image>", ""), add_special_tokens=False).input_ids) for text, trained in segs if trained)
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == expected
    assert {"red", "yes"} <= set(trained_text(tok, enc)) and "what" not in trained_text(tok, enc)


def test_plain_template_trains_the_caption_only():
    tok = tiny_tokenizer()
    enc = tokenize_segments(tok, segments("plain", [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red blue"}]))
    assert enc.input_ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert trained_text(tok, enc) == ["red", "blue"]


def test_truncation_budgets_image_features_and_never_cuts_an_image():
    enc = Tokenized([1, IMAGE_TOKEN_INDEX, 5, 6, 7, 8], [-100, -100, -100, 6, 7, 8])
    assert truncate(enc, [9], 100) is enc
    cut = truncate(enc, [9], 12)  # 1 + 9 + 2 text tokens
    assert cut.input_ids == [1, IMAGE_TOKEN_INDEX, 5, 6] and cut.labels == [-100, -100, -100, 6]
    assert truncate(enc, [9], 9) is None  # the image itself does not fit


def test_broken_samples_are_skipped_counted_and_named(tmp_path):
    extra = [
        {"id": "gone", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}]},
        {"id": "two-ph", "image": "red.png", "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "red"}]},
        {"id": "mute", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "odd", "conversations": [{"from": "robot", "value": "hi"}]},
        "not a record",
    ]
    data = write_data(tmp_path, n=6, extra=extra)
    samples, report = read_records(data, str(tmp_path / "images"))
    assert len(samples) == 6 and report.total == 5
    assert report.counts == {"missing_image": 1, "image_placeholder_mismatch": 1, "no_answer": 1, "bad_record": 2}
    assert "gone" in report.summary() and "missing" in report.summary()
    # JSON lines: a bad line is one skipped sample; a broken JSON list is an error naming the position
    lines = [json.dumps(r) for r in json.loads(data.read_text())[:3]] + ["{broken"]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    samples, report = read_records(tmp_path / "d.jsonl", str(tmp_path / "images"))
    assert len(samples) == 3 and report.counts == {"bad_json": 1} and "line 4" in report.summary()
    (tmp_path / "bad.json").write_text('[{"id": 1,]')
    with pytest.raises(ValueError, match="line 1 column"):
        read_records(tmp_path / "bad.json", None)


def test_an_image_that_does_not_decode_is_replaced_and_reported(tmp_path):
    data = write_data(tmp_path, n=4, text_only_every=0)
    (tmp_path / "images" / "red.png").write_bytes(b"not a png")  # exists (passes the up-front stat) but is corrupt
    samples, _ = read_records(data, str(tmp_path / "images"))
    ds = ConversationDataset(samples, tiny_tokenizer(), PmodProcessor(tiny_tokenizer(), tiny_config()), get_template("chat_nosys"), 512)
    item = ds[0]  # sample 0 is red: replaced by sample 1
    assert item["skipped"] and item["skipped"][0][0] == "bad_image" and "s0" in item["skipped"][0][1]
    assert ds[1]["skipped"] == []


def test_collator_pads_right_and_counts_targets(tmp_path):
    data = write_data(tmp_path, n=4)
    samples, _ = read_records(data, str(tmp_path / "images"))
    tok = tiny_tokenizer()
    ds = ConversationDataset(samples, tok, PmodProcessor(tok, tiny_config()), get_template("chat_nosys"), 512)
    batch = Collator(tok.pad_token_id, anyres=False)([ds[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["images"].shape == (3, 3, 42, 42) and len(batch["image_sizes"]) == 3
    assert batch["attention_mask"][:, 0].all() and (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["num_targets"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert batch["num_tokens"] == int(batch["attention_mask"].sum()) + 3 * (9 - 1)


def test_grouping_keeps_modalities_apart_and_is_deterministic():
    lengths = list(range(40))
    has_image = [i % 3 != 0 for i in range(40)]
    a = global_batches(lengths, has_image, 4, seed=1, epoch=0)
    assert a == global_batches(lengths, has_image, 4, seed=1, epoch=0) != global_batches(lengths, has_image, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(40))  # every sample once per epoch
    for b in a:
        assert len({has_image[i] for i in b}) == 1  # one modality per micro-batch
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    # 26 image + 14 text-only samples: 6 + 3 full batches, then the two partial ones, last; a partial batch is
    # dropped only when it is smaller than the world size (some rank would get no row)
    assert [len(b) for b in a] == [4] * 9 + [2, 2]
    assert [len(b) for b in global_batches(lengths, has_image, 4, seed=1, epoch=0, min_size=3)] == [4] * 9


def test_rank_slices_partition_the_global_batch():
    batch = list(range(7))
    assert [rank_slice(batch, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6]]
    stream = BatchStream([1] * 10, [True] * 10, 4, seed=0, group=True, world=2)
    assert stream.per_epoch == 3 and stream.at(3) == stream.epoch(1)[0]


def test_cosine_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from pmod.training.schedule import build_scheduler

    for kind, ref in (("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)):
        p = [torch.nn.Parameter(torch.zeros(1))]
        ours = build_scheduler(torch.optim.SGD(p, lr=2e-5), kind, total=100, warmup_ratio=0.03)
        theirs = ref(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5), math.ceil(100 * 0.03), 100)
        for _ in range(100):
            assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), rel=1e-12, abs=1e-15)
            ours.optimizer.step(), ours.step(), theirs.optimizer.step(), theirs.step()
        state = ours.state_dict()
        assert state["lr_lambdas"][0] == {"kind": kind, "warmup": 3, "total": 100}
