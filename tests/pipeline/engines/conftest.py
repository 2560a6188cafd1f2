"""Fixtures for the engine tests: one tiny real-architecture model per session, synthetic media from numpy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.engines.omni import OmniEngine
from pipeline.engines.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache_dir: Path) -> Path:
    return ensure_tiny_model(tiny_cache_dir)


def tiny_settings(cache_dir: Path, **overrides: Any) -> Settings:
    """Explicit settings for the tiny model, so ``OMNIQ_*`` variables in the environment cannot leak in."""
    values: dict[str, Any] = {
        "model": "tiny",
        "cache_dir": cache_dir,
        "device": "cpu",
        "dtype": "auto",
        "batch_size": 4,
        "fps": 2.0,
        "frame_max_pixels": 448 * 448,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def engine(tiny_cache_dir: Path) -> OmniEngine:
    """A loaded engine on the tiny model (CPU, batches of 4), shared by the session."""
    loaded = OmniEngine(tiny_settings(tiny_cache_dir))
    loaded.load()
    return loaded


@pytest.fixture
def make_engine(tiny_cache_dir: Path) -> Callable[..., OmniEngine]:
    """A fresh loaded engine on the tiny model with some settings changed (loading takes ~0.1 s)."""

    def make(**overrides: Any) -> OmniEngine:
        fresh = OmniEngine(tiny_settings(tiny_cache_dir, **overrides))
        fresh.load()
        return fresh

    return make
