"""pmod_synth: a small local VQA task for lmms-eval (coloured shapes on clutter, `pmod.tools.synthetic`), shipped inside
the package so that it runs from a wheel as from a source checkout, offline.

    pmod eval --tasks pmod_synth [--synth-data DIR] [--limit 4]    # the embedded default model unless --model
    python -m pmod.evaluation.pmod_synth --out DIR [--n 100]       # a dataset and a task folder for lmms-eval itself
    lmms-eval --model pmod --model_args pretrained=CKPT --tasks pmod_synth --include_path DIR/tasks

`pmod_synth.yaml` is the task; the task folder that `pmod.evaluation.run.synth_task_folder` writes includes it and
sets where the data is (`data_files`, `data_root`). `utils.py` holds the document hooks lmms-eval loads by path.
Dataset format: test.jsonl (one JSON object per line: id, image, question, answer, type) and the images it names.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_N", "TASK_YAML"]

TASK_YAML = Path(__file__).with_name("pmod_synth.yaml")
DEFAULT_N = 100  # samples of the dataset `pmod eval` writes when no --synth-data is given
