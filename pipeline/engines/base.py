"""The engine interface: a model that turns batches of prompt requests into text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000


@dataclass
class GenerationRequest:
    """One row of a batched ``generate`` call.

    ``messages`` is a chat in the transformers multimodal format
    (``[{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": ...}]}]``);
    the media items carry no data: the arrays travel beside it so that the processor,
    not the chat template, sees them.
    """

    kind: str
    messages: list[dict[str, Any]]
    audio: np.ndarray | None = None  # float32 mono at SAMPLE_RATE
    video: np.ndarray | None = None  # uint8 (frames, height, width, 3)
    fps: float | None = None  # sampling rate of ``video``, frames per second
    use_audio_in_video: bool = False  # ``audio`` is the soundtrack of ``video``
    max_new_tokens: int = 128
    chunk: int | None = None  # the chunk this row belongs to (logs, failpoints); None for file-level rows


@dataclass
class GenerationResult:
    """The text a model wrote for one request, with accounting for metrics."""

    text: str
    new_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0  # the model's time for the whole batch (generate)
    prepare_seconds: float = 0.0  # the processor's time for the whole batch (encode, copy to the device)
    batch_size: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """A loaded-once model that answers batches of requests."""

    model_id: str
    random_weights: bool  # True when the text is random (the tiny offline model)

    def load(self) -> None:
        """Load weights and processor; idempotent, called lazily before the first batch."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer every request, in order; batches internally as the settings allow."""


@runtime_checkable
class ConcurrentEngine(Engine, Protocol):
    """An engine many caller threads use at once, whose rows share the model's batches (the pipelined
    transformers engine, vLLM): callers hand in every row they have and get each row's outcome."""

    def generate_each(
        self, requests: list[GenerationRequest], prepared: Callable[[], None] | None = None
    ) -> list[GenerationResult | BaseException]:
        """Each request's answer, or the exception that row alone raised; ``prepared`` is called once every row
        has become model inputs (the caller may let go of the media)."""

    def close(self) -> None:
        """Finish the rows under way and stop the engine's threads."""
