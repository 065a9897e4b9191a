"""Benchmark evaluation with lmms-eval: the `pmod` model plugin, the paper's task list and the results table.

lmms-eval finds the plugin through the Python entry-point group ``lmms_eval.models`` (see pyproject.toml), which
loads `lmms_manifest` below when lmms-eval builds its model registry. That happens on every lmms-eval start, for
any model, so this module imports nothing heavy: the model class itself (`pmod.evaluation.lmms_plugin`) is only
imported when someone asks for ``--model pmod``.

    lmms-eval --model pmod --model_args pretrained=PATH --tasks mme --output_path out/
    pmod eval --model PATH [--compare DENSE_PATH] [--tasks mme,gqa] --output out/
"""
from __future__ import annotations

__all__ = ["JOURNAL_GLOB", "MODEL_ID", "PLUGIN_CLASS", "lmms_manifest"]

MODEL_ID = "pmod"
PLUGIN_CLASS = "pmod.evaluation.lmms_plugin.PmodLmms"
JOURNAL_GLOB = "pmod_requests.rank*.jsonl"  # the plugin's per-request journal, one file per process


def lmms_manifest():
    """The ``lmms_eval.models`` entry point: a ModelManifest naming our class by its import path (lazy)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=PLUGIN_CLASS)
