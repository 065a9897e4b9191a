"""The lmms-eval model ``pmod``: any checkpoint pmod loads (p-MoD or dense), batched, on one or several processes.

    lmms-eval --model pmod --model_args pretrained=PATH[,dtype=bfloat16,attn_backend=sdpa,conv_template=vicuna_v1]
              --tasks mme --batch_size 8 --output_path out/
    accelerate launch --num_processes 8 -m lmms_eval --model pmod ...      # one GPU per process

Why our own plugin rather than lmms-eval's ``llava``: the official LLaVA code cannot generate at batch > 1 and
knows nothing of routing. Prompts follow lmms-eval's LLaVA model (an ``<image>`` line before the question when the
task names none, then the checkpoint's conversation template, vicuna_v1 for the paper's models).

Every request also leaves one JSON line in a journal, ``pmod_requests.rank<R>.jsonl``: its prefill cost measured by
`pmod.evaluation.efficiency.measure_efficiency` on that request's own layout (vision tokens, kept-token ratio, TFLOPs and KV bytes
against the dense twin) and its response. `pmod.evaluation.run` averages the costs beside the scores. The journal is
written after every batch, so a run that is interrupted and started again with the same journal reuses the finished
deterministic responses instead of recomputing them (lmms-eval's ``--use_cache`` stores responses only once the
model has returned ALL requests of a type, so it does not help an interrupted run). The journal lives in ``log=DIR``
(model arg), else in ``--output_path`` of the command line, else nowhere (no costs, no resume).

Model args: pretrained (required), dtype (auto), device (cuda if available), batch_size (also the CLI's
--batch_size; model_args win), attn_backend (auto), conv_template (the checkpoint's), max_new_tokens (default for
tasks that give none: 1024), seed (0, for sampling), log, resume (true), max_pixels, prefix_cache_mb (0 = off).

``prefix_cache_mb=N`` keeps the reduced caches of prompt prefixes (up to the image) in `pmod.prefix_cache`, N MiB,
LRU: a question about an image already seen continues its cached prefix instead of prefilling the image again
(POPE and MME ask several per image). Requests then run one at a time; every journal line of a request says
``prefix_cache`` (hit / miss / none) with the running counts (``prefix_cache_stats``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

import pmod
from pmod.evaluation.efficiency import request_efficiency
from pmod.evaluation.journal import Journal, model_hash
from pmod.evaluation.requests import (
    canonical,
    cli_output_path,
    cut_at,
    deterministic,
    fingerprint,
    generation_settings,
    n_generated,
    task_images,
    with_placeholders,
)
from pmod.prefix_cache import PrefixCache, continue_prefix

__all__ = ["PmodLmms", "request_efficiency"]


class PmodLmms(lmms):
    is_simple = True

    def __init__(self, pretrained: str, dtype: str = "auto", device: str | None = None, batch_size: int | str = 1,
                 attn_backend: str = "auto", conv_template: str | None = None, max_new_tokens: int = 1024,
                 seed: int = 0, log: str | None = None, resume: bool | str = True, max_pixels: int | None = None,
                 max_batch_size: int | None = None, prefix_cache_mb: float = 0, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"pmod: unknown model_args {sorted(unknown)}; known: pretrained, dtype, device, batch_size, "
                             "attn_backend, conv_template, max_new_tokens, seed, log, resume, max_pixels, prefix_cache_mb")
        if str(batch_size).startswith("auto"):
            raise ValueError("pmod: batch_size=auto is not supported; pass an integer (--batch_size 8)")
        self.accelerator = Accelerator()
        acc = self.accelerator
        if acc.num_processes > 1:  # data parallel: one replica per process, lmms-eval shards by rank
            device = f"cuda:{acc.local_process_index}" if torch.cuda.is_available() else "cpu"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._rank, self._world_size, self._device = acc.process_index, acc.num_processes, torch.device(device)
        self._model = pmod.from_pretrained(pretrained, dtype=dtype, device=device, attn_backend=attn_backend).eval()
        kw = {"max_pixels": int(max_pixels)} if max_pixels else {}
        self.processor = pmod.load_processor(pretrained, template=conv_template, **kw)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens, self.seed = int(max_new_tokens), int(seed)
        self.fingerprint = fingerprint(pretrained, dtype, self.processor.template.name, self.processor.max_pixels)
        folder = Path(log) if log else cli_output_path()
        self.journal = Journal(folder, self._rank, str(resume).lower() not in ("false", "0", "no"), model_hash(self.fingerprint))
        self.prefixes = PrefixCache(int(float(prefix_cache_mb) * 2**20)) if float(prefix_cache_mb) > 0 else None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PmodLmms:
        """As lmms' own, except that a key given both in model_args and by the CLI (batch_size, device) is not an
        error: model_args win."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # --- what lmms-eval reads ----------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.processor.tokenizer.eos_token_id

    # --- requests ------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult | str]:
        out: list = [None] * len(requests)
        for idx in self._progress(self._batches(requests, lambda r: canonical(r.args[1])), len(requests), "generate"):
            batch = [requests[i] for i in idx]
            keys = [self._key(r, canonical(r.args[1])) for r in batch]
            todo = [j for j, k in enumerate(keys) if k not in self.journal.done or not deterministic(batch[j].args[1])]
            for j, k in enumerate(keys):
                if j not in todo:
                    out[idx[j]] = self.journal.done[k]
            if todo:
                texts, counts, records = self._generate([batch[j] for j in todo])
                for j, text, tc, rec in zip(todo, texts, counts, records):
                    out[idx[j]] = GenerationResult(text=text, token_counts=tc)
                    rec.update(key=keys[j], response=text, deterministic=deterministic(batch[j].args[1]))
                self.journal.write(records)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out: list = [None] * len(requests)
        for idx in self._progress(self._batches(requests, lambda r: ""), len(requests), "loglikelihood"):
            batch = [requests[i] for i in idx]
            conts = [self._continuation(r) for r in batch]
            keys = [self._key(r, c) for r, c in zip(batch, conts)]
            todo = [j for j, k in enumerate(keys) if k not in self.journal.done]
            for j, k in enumerate(keys):
                if j not in todo:
                    out[idx[j]] = tuple(self.journal.done[k])
            if todo:
                scores, records = self._score([batch[j] for j in todo], [conts[j] for j in todo])
                for j, s, rec in zip(todo, scores, records):
                    out[idx[j]] = s
                    rec.update(key=keys[j], response=list(s), deterministic=True)
                self.journal.write(records)
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Rounds per document: round 0 answers the context; the task's doc_to_text(doc, previous_output=...,
        round_idx=r, previous_round_info=...) then gives the next (visuals, context, terminal, outputs, info)."""
        results = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals, outputs, info, r = doc_to_visual(doc), [], None, 0
            while True:
                if r > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=outputs, round_idx=r, previous_round_info=info)
                    outputs = list(outputs)
                    if terminal:
                        break
                texts, _, records = self._run_generation([context], [task_images(visuals, task)], gen_kwargs)
                for rec in records:
                    rec.update(task=task, split=split, doc_id=doc_id, idx=req.idx, round=r, reqtype="generate_until_multi_round")
                self.journal.write(records)
                outputs.append(texts[0])
                r += 1
            results.append(outputs)
        return results

    # --- helpers -------------------------------------------------------------------------------------------------
    def _batches(self, requests: list[Instance], group) -> list[list[int]]:
        """Indices in batches of batch_size: requests grouped by `group` (same generation settings), longest
        context first within a group, so that padding stays small and an out-of-memory shows up at once."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(group(r), []).append(i)
        out = []
        for idx in groups.values():
            idx.sort(key=lambda i: -len(str(requests[i].args[0])))
            out += [idx[s : s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        return out

    def _progress(self, batches: list[list[int]], total: int, what: str):
        """Yield the batches, with a progress bar of requests on rank 0."""
        with tqdm(total=total, desc=f"pmod {what}", disable=self._rank != 0, unit="req") as bar:
            for idx in batches:
                yield idx
                bar.update(len(idx))

    def _visuals(self, req: Instance) -> list:
        task, split, doc_id = req.args[-2], req.args[-1], req.args[-3]
        return task_images(req.args[2](self.task_dict[task][split][doc_id]), task)

    def _generate(self, batch: list[Instance]):
        texts, counts, records = self._run_generation([r.args[0] for r in batch], [self._visuals(r) for r in batch],
                                                      batch[0].args[1])
        for r, rec in zip(batch, records):
            rec.update(task=r.task_name, split=r.args[-1], doc_id=r.doc_id, idx=r.idx, reqtype="generate_until")
        return texts, counts, records

    def _run_generation(self, contexts: list[str], images: list[list], gen_kwargs: dict):
        if self.prefixes is not None:
            return self._run_with_prefixes(contexts, images, gen_kwargs)
        kw = generation_settings(gen_kwargs, self.max_new_tokens)
        until = kw.pop("until")
        inputs = self.processor(contexts, images=images, chat=True)
        gen = torch.Generator(device=self.device).manual_seed(self.seed) if kw["do_sample"] else None
        tokens = self._model.generate(**inputs, **kw, stop_strings=until or None, tokenizer=self.tokenizer, generator=gen)
        return self._results(inputs, tokens, until)

    def _run_with_prefixes(self, contexts: list[str], images: list[list], gen_kwargs: dict):
        """One request at a time, each continuing its prefix's cached prefill when the prefix cache has it."""
        texts, counts, records = [], [], []
        for ctx, ims in zip(contexts, images):
            kw = generation_settings(gen_kwargs, self.max_new_tokens)
            until = kw.pop("until")
            inputs = self.processor([ctx], images=[ims], chat=True)
            gen = torch.Generator(device=self.device).manual_seed(self.seed) if kw["do_sample"] else None
            args, hit = continue_prefix(self._model, self.prefixes, inputs["input_ids"], inputs["images"],
                                        inputs["image_sizes"], salt=json.dumps(self.fingerprint, default=str),
                                        max_new_tokens=kw["max_new_tokens"])
            tokens = self._model.generate(**args, **kw, stop_strings=until or None, tokenizer=self.tokenizer, generator=gen)
            t, c, r = self._results(inputs, tokens, until)
            r[0].update(prefix_cache="none" if "past_key_values" not in args else ("hit" if hit else "miss"),
                        prefilled_tokens=int(args["input_ids"].shape[1]), prefix_cache_stats=self.prefixes.stats().as_dict())
            texts, counts, records = texts + t, counts + c, records + r
        return texts, counts, records

    def _results(self, inputs: dict, tokens: torch.Tensor, until: list[str]):
        texts = [cut_at(self.processor.decode(row), until) for row in tokens]
        records = self._efficiency(inputs)
        eos = set(self._model.config.text.eos_token_ids)
        counts = [TokenCounts(input_tokens=rec["n_vision"] + rec["n_text"], output_tokens=n_generated(row, eos))
                  for row, rec in zip(tokens.tolist(), records)]
        return texts, counts, records

    def _continuation(self, req: Instance) -> str:
        target = req.args[1]
        task, split, doc_id = req.args[-2], req.args[-1], req.args[-3]
        return target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])

    def _score(self, batch: list[Instance], conts: list[str]) -> tuple[list[tuple[float, bool]], list[dict]]:
        """log P(continuation | context) summed over its tokens, and whether greedy decoding would produce it."""
        images = [self._visuals(r) for r in batch]
        prompts, n_cont = [], []
        for r, ims, cont in zip(batch, images, conts):
            ctx = self.processor.apply_template([{"role": "user", "content": with_placeholders(r.args[0], len(ims))}])
            whole, head = self.processor.encode(ctx + cont), self.processor.encode(ctx)
            if len(whole) <= len(head):
                raise ValueError(f"pmod: the continuation {cont!r} of {r.task_name} doc {r.doc_id} has no tokens")
            prompts.append(ctx + cont)
            n_cont.append(len(whole) - len(head))
        inputs = self.processor(prompts, images=images, chat=False, padding_side="right")
        with torch.inference_mode():
            out = self._model(**inputs, output_routing=False)
        scores = []
        for b, n in enumerate(n_cont):
            pos = out.attention_mask[b].nonzero().squeeze(1)  # merged positions of the row's real tokens
            target = inputs["input_ids"][b][inputs["attention_mask"][b].bool()][-n:].to(out.logits.device)  # [n]
            logp = torch.log_softmax(out.logits[b, pos[-n - 1 : -1]].float(), dim=-1)  # [n, V], predicting target
            scores.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        records = self._efficiency(inputs)
        for r, rec in zip(batch, records):
            rec.update(task=r.task_name, split=r.args[-1], doc_id=r.doc_id, idx=r.idx, reqtype="loglikelihood")
        return scores, records

    def _efficiency(self, inputs: dict) -> list[dict]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        counts = self._model.image_token_counts(inputs["images"], inputs["image_sizes"]) if inputs["images"] is not None else []
        per_row = (ids == pmod.IMAGE_TOKEN_INDEX).logical_and(mask.bool()).sum(1).tolist()
        out, start = [], 0
        for b, n in enumerate(per_row):
            out.append({**request_efficiency(self._model, ids[b : b + 1], mask[b : b + 1], counts[start : start + n]),
                        "model": self.fingerprint["path"], "rank": self._rank})
            start += n
        return out

    def _key(self, req: Instance, what: str) -> str:
        payload = [self.fingerprint, req.request_type, req.task_name, req.args[-1], req.doc_id, req.idx, str(req.args[0]), what]
        return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:32]


