"""The built-in bench sections, imported in run order (each module registers its own with `register_section`).

A new section is a new module `pmod/bench/section_<name>.py` and one import line below; `pmod bench --sections`
then selects it and the runner writes it into results.{json,md} like the rest.
"""
from __future__ import annotations

# the import order is the run order
# isort: off
from pmod.bench.section_prefill import _routing_nontrivial, bench_prefill, ideal_curve  # noqa: F401  (prefill)
from pmod.bench.section_decode import bench_decode  # noqa: F401  (decode)
from pmod.bench.section_hf import StepClock, bench_hf_decode, bench_hf_prefill, floor_step  # noqa: F401  (hf_*)
from pmod.bench.section_batching import bench_batching, bench_packing  # noqa: F401  (batching, packing)
from pmod.bench.section_train import bench_train_step  # noqa: F401  (train_step, an extra)
from pmod.bench.section_kernels import bench_kernels  # noqa: F401  (kernels, an extra)
from pmod.bench import section_e2e  # noqa: F401  (prefill_batch, generate_e2e)
# isort: on
