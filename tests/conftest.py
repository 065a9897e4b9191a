"""Shared test fixtures: paths to the official reference fixtures and tiny configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PMOD_SHARED", REPO.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "official-pmod-tiny"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"official fixtures not found at {OFFICIAL}; set PMOD_SHARED to the shared/ folder")
    return OFFICIAL


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
