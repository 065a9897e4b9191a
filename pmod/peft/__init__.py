"""Fine-tuning strategies for the p-MoD decoder: their protocol and registry (`pmod.peft.strategy`) and each one.

    import pmod.peft
    pmod.peft.list_strategies()   # full, gradnormlorp, lisa, lora, lora-ggpo, lora-mgpo, bone, miss, ticket
    pmod train ... --strategy lora --strategy-option r=16

Each strategy is a small class in its own module (algorithm, defaults and invariants in its docstring); the
training loop drives them through the seam's hooks. `load_trained(model, folder)` re-applies what a run
trained (`folder/strategy/`) to its base model; the run's exported checkpoint is already merged.
"""
from __future__ import annotations

import logging


def _quiet_bitsandbytes_kernel_probe() -> None:
    """`import peft` imports bitsandbytes, whose CPU backend (on CPUs with AVX512-BF16) looks for a 4-bit GEMM in
    Hugging Face's `kernels` hub package and logs a warning when that is not installed. pmod never runs 4-bit GEMMs
    (bitsandbytes only holds 8-bit optimizer states here), so that one message is dropped; others pass."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())


_quiet_bitsandbytes_kernel_probe()

from pmod.peft import bone, ggpo, gradnormlorp, lisa, lora, ticket  # noqa: F401  (register the strategies)
from pmod.peft.base import (
    TARGETS,
    PeftStrategy,
    load_trained,
    optimizer_state_bytes,
    optimizer_state_bytes_8bit,
    target_linears,
    trainable_count,
)
from pmod.peft.roles import ROLES, param_role, set_trainable, trainable_summary
from pmod.peft.strategy import BaseStrategy, FullStrategy, Strategy, get_strategy, list_strategies, register_strategy

__all__ = [
    "ROLES",
    "BaseStrategy",
    "FullStrategy",
    "Strategy",
    "param_role",
    "register_strategy",
    "set_trainable",
    "trainable_summary",
    "TARGETS",
    "PeftStrategy",
    "get_strategy",
    "list_strategies",
    "load_trained",
    "optimizer_state_bytes",
    "optimizer_state_bytes_8bit",
    "target_linears",
    "trainable_count",
]
