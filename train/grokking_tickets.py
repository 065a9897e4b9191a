"""Grokking tickets (Minegishi et al., arXiv 2310.19470) in the paper's setting: steps until 95 % test accuracy for
the dense network, its ticket and a random-pruning control of the same density.

    nice -n 5 python train/grokking_tickets.py --arch mlp --seeds 0 1 2          # one process per architecture
    nice -n 5 python train/grokking_tickets.py --arch transformer --seeds 0 1
    python train/grokking_tickets.py --report                                   # results.{json,md,png}

Per architecture and seed: (1) dense from W_0 (AdamW, weight decay 1) until `--dense-patience` steps after it
first reaches 95 % test accuracy: the generalised network; (2) `ticket`: the global top `--keep` of its |W|,
rewound to W_0, same optimiser; (3) `ticket-wd0`: the same without weight decay (the paper's claim that the
ticket, not the decay, removes the delay); (4) `random`: a uniformly random mask of the ticket's density,
rewound to W_0, weight decay 1; (5) `memorized`: a magnitude ticket taken instead from the dense network at the
step it first fits the whole training set (before it generalises), the paper's "non-grokked" ticket. On
request: `ticket-local` (the top --keep of each tensor, not global) and `ticket-newinit` (the ticket's mask on a
different random init: does the mask alone carry the speed-up?) and `ticket-delta` (pmod.peft.ticket's default
mode for pretrained models: the top |W_T - W_0|, W_0 kept everywhere, only the kept entries train, decay 0). Every run
but (1) stops `--patience` steps after 95 % or at `--cap` x the dense run's steps to 95 % (default 1: a run
that is not faster than dense is cut there; this bounds the CPU time). Writes runs-<arch>.json into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pmod.grokking import (GrokConfig, build_model, control_mask, density, revive_dead_neurons,  # noqa: E402
                           rewind, split, steps_to, ticket_mask, train)

OUT = REPO / "eval" / "results" / "grokking-2026-12-02"
RUNS = ("dense", "ticket", "random", "ticket-wd0", "memorized")  # the key comparison first
VARIANTS = ("ticket-local", "ticket-newinit", "ticket-delta")  # diagnostics, on request (--runs)


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    os.replace(tmp, path)


def one_seed(arch: str, seed: int, args: argparse.Namespace, save=None) -> dict:
    base = GrokConfig(arch=arch, p=args.p, frac_train=args.frac, seed=seed, data_seed=seed, steps=args.max_steps,
                      eval_every=args.eval_every)
    data = split(base.p, base.frac_train, base.data_seed, base.symmetric)
    model = build_model(base)
    init = {n: t.detach().clone() for n, t in model.named_parameters()}
    snap: dict[str, dict] = {}

    def at_memorized(step: int, hist: dict) -> None:  # first full fit of the training set
        progress(step, hist, "dense")
        if "memorized" not in snap and hist["train_acc"][-1] >= 1.0:
            snap["memorized"] = {"step": step, "test_acc": hist["test_acc"][-1],
                                 "state": {n: t.detach().clone() for n, t in model.named_parameters()}}

    def progress(step: int, hist: dict, name: str) -> None:
        if step % args.log_every == 0:
            print(f"[{arch} s{seed}] {name} step {step}: train {hist['train_acc'][-1]:.3f} test {hist['test_acc'][-1]:.3f}",
                  flush=True)

    out: dict = {"arch": arch, "seed": seed, "p": base.p, "frac_train": base.frac_train, "keep": args.keep,
                 "n_train": len(data[0]), "n_test": len(data[1]), "runs": {}}
    t0 = time.time()
    hist = train(model, base, data=data, stop_at=0.95, stop_patience=args.dense_patience, on_eval=at_memorized)
    out["runs"]["dense"] = {"hist": hist, "seconds": time.time() - t0, "weight_decay": base.weight_decay, "density": 1.0}
    trained = {n: t.detach().clone() for n, t in model.named_parameters()}
    generalised = steps_to(hist) is not None
    print(f"[{arch} s{seed}] dense: 95% at {steps_to(hist)}, {time.time() - t0:.0f}s", flush=True)

    def masks_from(weights: dict) -> dict:
        m = ticket_mask(weights, args.keep)
        return revive_dead_neurons(m) if arch == "mlp" and args.revive else m

    ticket = masks_from(trained)
    dens = density(ticket)
    plans = {"ticket": (ticket, base.weight_decay), "ticket-wd0": (ticket, 0.0),
             "random": (control_mask(init, dens, seed=10_000 + seed), base.weight_decay)}
    local = {n: ticket_mask({n: w}, args.keep)[n] for n, w in trained.items()}  # per-tensor threshold
    plans["ticket-local"] = (revive_dead_neurons(local) if arch == "mlp" and args.revive else local, base.weight_decay)
    plans["ticket-newinit"] = (ticket, base.weight_decay)  # the mask on a different random init
    # pmod.peft.ticket's default `delta` mode (for pretrained models): score |W_T - W_0|, keep W_0 everywhere,
    # train only the kept entries, weight decay 0 (that mode forbids decay: it would move the frozen entries)
    plans["ticket-delta"] = (ticket_mask({n: trained[n] - init[n] for n in trained}, args.keep), 0.0)
    if "memorized" in snap:
        plans["memorized"] = (masks_from(snap["memorized"]["state"]), base.weight_decay)
        out["memorized_at"] = {"step": snap["memorized"]["step"], "test_acc": snap["memorized"]["test_acc"]}
    out["generalised"] = generalised
    # Pruned runs stop at --cap x the dense run's steps to 95 % (a run slower than that is no speed-up; this
    # bounds the CPU time); without a dense 95 %, at --max-steps.
    d95 = steps_to(hist)
    cap = min(args.max_steps, max(int(args.cap * d95), 100)) if d95 is not None else args.max_steps
    out["pruned_cap"] = cap
    for name in args.runs:
        if name == "dense" or name not in plans:
            continue
        mask, wd = plans[name]
        cfg = dataclasses.replace(base, weight_decay=wd, steps=cap)
        m = build_model(cfg)
        start = init
        if name == "ticket-newinit":
            start = {n: t.detach() for n, t in build_model(dataclasses.replace(cfg, seed=cfg.seed + 1000)).named_parameters()}
        rewind(m, start, None if name == "ticket-delta" else mask)  # delta: nothing is zeroed
        t0 = time.time()
        h = train(m, cfg, masks=mask, data=data, stop_at=0.95, stop_patience=args.patience,
                  on_eval=lambda st, hi, name=name: progress(st, hi, name))
        out["runs"][name] = {"hist": h, "seconds": time.time() - t0, "weight_decay": wd, "density": density(mask)}
        print(f"[{arch} s{seed}] {name}: 95% at {steps_to(h)}, {time.time() - t0:.0f}s", flush=True)
        if save is not None:
            save(out)  # partial results survive a stopped run
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("mlp", "transformer"), default="mlp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--p", type=int, default=97)
    ap.add_argument("--frac", type=float, default=0.4, help="training fraction of the pairs a <= b")
    ap.add_argument("--keep", type=float, default=0.4, help="fraction of weights the ticket keeps (official 0.4)")
    ap.add_argument("--max-steps", type=int, default=20_000)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--dense-patience", type=int, default=2000, help="dense steps after 95%% before pruning")
    ap.add_argument("--cap", type=float, default=1.0, help="pruned runs stop at cap x dense steps to 95%%")
    ap.add_argument("--patience", type=int, default=300, help="steps recorded after a pruned run reaches 95%%")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS + VARIANTS)
    ap.add_argument("--no-revive", dest="revive", action="store_false", help="skip the official relive_neurons")
    ap.add_argument("--log-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--tag", default="", help="suffix of the runs file (runs-<arch><tag>.json)")
    ap.add_argument("--report", action="store_true", help="merge runs-*.json in --out into results.{json,md,png}")
    args = ap.parse_args(argv)
    if args.report:
        from grokking_report import report  # this folder

        report(args.out)
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = []
    def save(partial: dict | None = None) -> None:
        payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "torch": torch.__version__, "wall_seconds": time.time() - t0,
                   "seeds": results + ([partial] if partial is not None else [])}
        write_atomic(args.out / f"runs-{args.arch}{args.tag}.json", json.dumps(payload))

    for seed in args.seeds:
        results.append(one_seed(args.arch, seed, args, save))
        save()
    print(f"[{args.arch}] done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
