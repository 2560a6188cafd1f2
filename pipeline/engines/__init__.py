"""Model engines: the protocol in ``base``; Qwen3-Omni through transformers in ``omni`` (pipelined for many callers
in ``pipelined``) and on vLLM in ``vllm_engine``; Whisper in ``whisper``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.engines.base import ConcurrentEngine


def check_engine(settings: Settings) -> None:
    """Refuse, before any work, an engine that cannot run here: ``vllm`` where vLLM is not installed, or with a
    checkpoint vLLM cannot serve (both one line naming what to do)."""
    if settings.engine != "vllm":
        return
    from pipeline.engines.omni import model_source
    from pipeline.engines.vllm_engine import check_architecture, check_installed

    check_installed()
    check_architecture(model_source(settings))


def concurrent_engine(settings: Settings) -> ConcurrentEngine:
    """The engine ``settings.engine`` names, for many caller threads: transformers behind the pipelined batcher,
    or vLLM (which batches continuously on its own). Loaded on first use."""
    if settings.engine == "vllm":
        from pipeline.engines.vllm_engine import VllmEngine

        return VllmEngine(settings)
    from pipeline.engines.omni import OmniEngine
    from pipeline.engines.pipelined import PipelinedEngine

    return PipelinedEngine(OmniEngine(settings), settings)
