"""The bench's sections behind one registry, so that a new one slots in without touching the runner.

A section is a name, the function that measures it on a `BenchContext` (the preset, the device and the models
every section shares), the number of timed calls it makes (the length of its progress bar: `time_interleaved`
ticks once per call, warm-up included) and how its results read in results.md. The runner (`cli.run_benchmark`)
runs the requested sections in registration order and writes results.{json,md} after each one, so a run that is
stopped keeps every section it finished. A section that only makes sense somewhere names its `devices`; an extra
that should not lengthen the default run says `default=False` and runs when `--sections` names it.

    register_section(Section("my_section", run=lambda ctx: {...}, calls=lambda ctx: ctx.rounds * 2,
                             markdown=lambda rows: ["## My section", "", ...], devices=("cuda",)))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pmod.bench.presets import Preset

__all__ = ["BenchContext", "Section", "get_section", "register_section", "section_names"]


@dataclass
class BenchContext:
    """What every section shares: shapes, device, repetitions and the models (built once per run)."""

    preset: Preset
    device: str
    warmup: int
    reps: int
    dense: Any  # PmodForConditionalGeneration, no MoD layers
    variants: dict[str, Any] = field(default_factory=dict)  # "prd" and "deep_all@r": the same weights + routers
    hf: Any = None  # transformers.LlamaForCausalLM on the dense weights, when a requested section needs it

    @property
    def pmod(self):
        """The default p-MoD model (PRD schedule)."""
        return self.variants["prd"]

    @property
    def rounds(self) -> int:
        """Calls of each timed callable: warm-up plus timed repetitions."""
        return self.warmup + self.reps


@dataclass(frozen=True)
class Section:
    """One part of a bench run. `run(ctx)` returns JSON-able results (stored under `name`); `calls(ctx)` the
    number of `time_interleaved` calls it will make; `markdown(results)` its lines in results.md (default: none)."""

    name: str
    run: Callable[[BenchContext], Any]
    calls: Callable[[BenchContext], int]
    markdown: Callable[[Any], list[str]] | None = None
    needs_hf: bool = False  # the runner builds the transformers twin once if any requested section needs it
    devices: tuple[str, ...] = ("cpu", "cuda")
    default: bool = True  # False: an extra that runs only when --sections names it (it would lengthen every run)


_REGISTRY: dict[str, Section] = {}


def register_section(section: Section, replace: bool = False) -> Section:
    if section.name in _REGISTRY and not replace:
        raise ValueError(f"bench section {section.name!r} is already registered")
    _REGISTRY[section.name] = section
    return section


def get_section(name: str) -> Section:
    if name not in _REGISTRY:
        raise ValueError(f"unknown bench section {name!r}; expected one of {list(_REGISTRY)}")
    return _REGISTRY[name]


def section_names(device: str | None = None) -> tuple[str, ...]:
    """Registered sections in run order: all of them (what --sections may name), or with `device` the default run
    there (its `devices`, `default` sections only)."""
    if device is None:
        return tuple(_REGISTRY)
    kind = device.split(":")[0]
    return tuple(n for n, s in _REGISTRY.items() if kind in s.devices and s.default)
