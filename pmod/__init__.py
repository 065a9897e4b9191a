"""pmod: p-MoD LLaVA-style models whose decoder skips most vision tokens in deep layers.

    import pmod
    model = pmod.from_pretrained("path/or/hub-id", dtype=torch.float32)
    out = model(input_ids=ids, images=pixels)        # ids hold pmod.IMAGE_TOKEN_INDEX where images go
"""
from __future__ import annotations

from pmod.cache import PmodCache
from pmod.config import ModConfig, PmodConfig, TextConfig, VisionConfig
from pmod.flops import count_flops, kv_cache_bytes
from pmod.io import load_config, save_pretrained
from pmod.multimodal.processor import PmodProcessor, load_processor
from pmod.modeling.llava import PmodForConditionalGeneration, PmodOutput, from_pretrained
from pmod.modeling.mod import RoutingRecord
from pmod.packing import IMAGE_TOKEN_INDEX, IGNORE_INDEX
from pmod.reduction import ReductionSpec
from pmod.schedule import prd_schedule

__version__ = "0.1.0"


def list_strategies() -> list[str]:
    """Names of the fine-tuning strategies `pmod train --strategy` accepts (imports pmod.peft lazily)."""
    from pmod.peft import list_strategies as _list

    return _list()

__all__ = [
    "IMAGE_TOKEN_INDEX", "IGNORE_INDEX", "PmodConfig", "TextConfig", "VisionConfig", "ModConfig",
    "PmodForConditionalGeneration", "PmodOutput", "PmodCache", "RoutingRecord",
    "from_pretrained", "load_config", "list_strategies", "load_processor", "PmodProcessor", "count_flops", "kv_cache_bytes", "save_pretrained", "prd_schedule", "ReductionSpec",
]
