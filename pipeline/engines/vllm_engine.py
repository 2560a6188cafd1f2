"""Qwen3-Omni's thinker on vLLM behind the :class:`~pipeline.engines.base.Engine` protocol (``OMNIQ_ENGINE=vllm``).

vLLM batches on its own, continuously: every row any caller thread hands in goes to its scheduler at once (no
fixed batches, no gathering window), and a row joins the running ones at the next step. One thread drives
vLLM's ``LLMEngine`` (add the rows that arrived, one scheduler step, hand out the rows that finished); callers
block on their rows' futures. The engine core runs in this process by default, so a worker that dies takes it
along (``OMNIQ_VLLM_ENGINE_PROCESS=true`` moves it into a process of its own, which overlaps input processing
with the GPU's work). The requests are the
transformers engine's, sent the same way: the prompt text comes out of the same chat template
(:func:`~pipeline.engines.omni.chat_prompt`), audio and frames go as ``multi_modal_data``, and the processor
settings the transformers engine passes (``fps``, the frame-size cap, no frame sampling, no 30 s audio
truncation, ``use_audio_in_video``) go per request as ``mm_processor_kwargs``. Greedy decoding, each row cut
to its own ``max_new_tokens``, and the checkpoint's ``suppress_tokens`` (which vLLM's sampler does not read)
become ``allowed_token_ids``, so both engines write the same tokens (``tests/pipeline/engines/test_vllm.py``).

No vLLM release accepts omniq's torch and transformers pins, so this module runs in an environment of its own
(``make vllm``: ``.venv-vllm/bin/omniq``; README "Engines"); importing it elsewhere works, loading says how to
get vLLM.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import failpoints, prompts
from pipeline.config import TINY_MODEL, Settings
from pipeline.engines.base import SAMPLE_RATE, GenerationRequest, GenerationResult
from pipeline.engines.omni import (
    _as_audio,
    _as_video,
    _audio_in_video,
    chat_prompt,
    model_source,
    resolve_device,
    resolve_dtype,
    stop_token_ids,
    trim_generated,
)
from pipeline.engines.pipelined import unwrap, watch_model_call
from pipeline.engines.tiny import TINY_MODEL_RANDOM_WEIGHTS
from pipeline.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "run 'make vllm' and start omniq from .venv-vllm/bin/omniq, or install vllm==0.33.0 (CUDA) into an "
    'environment of its own with deploy/vllm/install.py (README "Engines")'
)
# What vLLM serves Qwen3-Omni's thinker from: the released checkpoints' full layout, with a thinker_config
SERVED_ARCHITECTURES = ("Qwen3OmniMoeForConditionalGeneration",)
_IDS = itertools.count()


def check_installed() -> None:
    """Refuse ``--engine vllm`` in an environment without vLLM, in one line that says how to get it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"--engine vllm: vLLM is not installed in this environment; {INSTALL_HINT}")


def check_architecture(source: str) -> None:
    """Refuse a checkpoint vLLM cannot serve as Qwen3-Omni, naming its architecture (a local folder or a hub id
    already in the cache; vLLM itself checks one it downloads)."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except (ImportError, ValueError):
            cached = None
        if not isinstance(cached, str):
            return
        config_file = Path(cached)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--engine vllm: cannot read {config_file} ({exc})") from exc
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    if not any(name in SERVED_ARCHITECTURES for name in architectures):
        thinker_only = config.get("model_type") == "qwen3_omni_moe_thinker"
        raise ConfigError(
            f"--engine vllm cannot serve {'/'.join(architectures)} from {source}: it serves "
            f"{SERVED_ARCHITECTURES[0]} checkpoints (the released layout, config with a thinker_config)"
            + ("; this is a thinker-only checkpoint, which only --engine transformers loads" if thinker_only else "")
        )


@dataclass
class _Row:
    request: GenerationRequest
    inputs: dict[str, Any]
    params: Any
    future: Future[GenerationResult] = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)


class VllmEngine:
    """Qwen3-Omni on vLLM for any number of caller threads; rows are answered as vLLM's scheduler runs them."""

    concurrent = True  # callers hand in rows from many threads at once (``pipeline.infer``)

    def __init__(self, settings: Settings, *, load_format: str = "auto", fixed_length: bool = False) -> None:
        """``load_format="dummy"`` (benches): random weights from the checkpoint's config alone, no weight files;
        ``fixed_length``: every row writes its ``max_new_tokens`` (the end-of-answer tokens ignored)."""
        self.settings = settings
        self.model_id: str = settings.model
        self.random_weights: bool = (
            settings.model == TINY_MODEL and TINY_MODEL_RANDOM_WEIGHTS
        ) or load_format == "dummy"
        self.load_format, self.fixed_length = load_format, fixed_length
        self.batch_observers: list[Callable[[int, int, float], None]] = []
        self.processor: Any = None
        self.record_prompt_ids = False  # tests: each result's meta gets the prompt's token ids
        self.steps = 0  # scheduler steps run, and the most rows one step had under way (benches, tests)
        self.most_running = 0
        self._llm: Any = None
        self._load_lock = threading.Lock()
        self._template_lock = threading.Lock()  # the fast tokenizer cannot be used by two threads at once
        self._condition = threading.Condition()
        self._incoming: list[_Row] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stop_ids: set[int] = set()
        self._allowed: list[int] | None = None
        self._repetition_penalty = 1.0

    # -- loading -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Start vLLM on the model once; later calls return at once."""
        if self._llm is not None:
            return
        with self._load_lock:
            if self._llm is not None:
                return
            check_installed()
            source = model_source(self.settings)
            check_architecture(source)
            # vLLM reads these from the environment; omniq's settings decide them unless the operator did
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if self.settings.vllm_engine_process else "0")
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # a CUDA-using parent cannot fork
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, on the CPU build (vLLM's default: 4)
            # vLLM's own log setup writes to standard output (where `omniq run --json` prints); through the root
            # logger its records go where omniq's go, at omniq's level
            os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
            if logging.getLogger().getEffectiveLevel() >= logging.WARNING:  # the CPU build warns at every step
                logging.getLogger("vllm").setLevel(logging.ERROR)
            from transformers import AutoProcessor, GenerationConfig

            started = time.perf_counter()
            self.processor = AutoProcessor.from_pretrained(source)
            try:
                generation = GenerationConfig.from_pretrained(source)
            except OSError:
                generation = GenerationConfig()
            self._stop_ids = stop_token_ids(self.processor.tokenizer, generation.eos_token_id)
            self._allowed = _allowed_ids(generation, len(self.processor.tokenizer))
            self._repetition_penalty = float(generation.repetition_penalty or 1.0)
            self._llm = self._start(source)
            self._thread = threading.Thread(target=self._drive, name="omniq-vllm", daemon=True)
            self._thread.start()
            logger.info(
                "vLLM serves %s from %s in %.1fs%s",
                self.model_id,
                source,
                time.perf_counter() - started,
                " — random weights, text is meaningless" if self.random_weights else "",
            )

    def _start(self, source: str) -> Any:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        device = resolve_device(self.settings.device)
        dtype = resolve_dtype(self.settings.dtype, device)
        args = EngineArgs(
            model=source,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=self.settings.vllm_max_model_len,
            gpu_memory_utilization=self.settings.vllm_gpu_memory_utilization,
            tensor_parallel_size=self.settings.vllm_tensor_parallel_size,
            max_num_seqs=self.settings.vllm_max_num_seqs,
            enforce_eager=device.type != "cuda",  # CUDA graphs only where there is CUDA
            limit_mm_per_prompt={"audio": 1, "video": 1, "image": 0},
            load_format=self.load_format,
            seed=0,
            disable_log_stats=True,
        )
        try:
            return LLMEngine.from_engine_args(args)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(f"--engine vllm could not load {self.model_id!r} from {source}: {exc}") from exc

    def close(self) -> None:
        """Finish the rows under way, then stop the driving thread (the process exiting stops vLLM)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # -- generation ----------------------------------------------------------------------------------------

    def generate(
        self, requests: list[GenerationRequest], prepared: Callable[[], None] | None = None
    ) -> list[GenerationResult]:
        """Answer every request, in order; the first row that failed raises."""
        return [unwrap(outcome) for outcome in self.generate_each(requests, prepared)]

    def generate_each(
        self, requests: list[GenerationRequest], prepared: Callable[[], None] | None = None
    ) -> list[GenerationResult | BaseException]:
        """Every request's answer, or the exception that row alone raised; all rows go to vLLM at once.

        ``prepared`` is called once the rows are handed over (vLLM turns the arrays into its own tensors).
        """
        self.load()
        started = time.perf_counter()
        futures: list[Future[GenerationResult]] = []
        rows: list[_Row] = []
        for request in requests:
            try:
                inputs, params = self._inputs(request)
            except Exception as error:  # a bad row fails alone
                failed: Future[GenerationResult] = Future()
                failed.set_exception(error)
                futures.append(failed)
                continue
            rows.append(_Row(request, inputs, params))
            futures.append(rows[-1].future)
        with self._condition:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._incoming.extend(rows)
            self._condition.notify_all()
        if prepared is not None:
            prepared()
        with watch_model_call(self.settings, requests, label="vLLM generate"):
            failpoints.hit("gpu.generate", rows=len(requests))
            outcomes: list[GenerationResult | BaseException] = []
            for future in futures:
                error = future.exception()
                outcomes.append(error if error is not None else future.result())
        results = [o for o in outcomes if isinstance(o, GenerationResult)]
        seconds = time.perf_counter() - started
        for observer in self.batch_observers:
            observer(len(results), sum(r.new_tokens for r in results), seconds)
        if results:
            logger.info(
                "generated %d rows (%s) in %.2fs: %d prompt + %d new tokens (vLLM)",
                len(results),
                ",".join(r.kind for r, o in zip(requests, outcomes, strict=True) if isinstance(o, GenerationResult)),
                seconds,
                sum(r.prompt_tokens for r in results),
                sum(r.new_tokens for r in results),
            )
        return outcomes

    def _inputs(self, request: GenerationRequest) -> tuple[dict[str, Any], Any]:
        """vLLM's prompt (text, media, processor settings) and sampling parameters for one row."""
        from vllm import SamplingParams

        if (kind := prompts.row_kind(request.kind)) is not None:
            failpoints.hit("infer.row", chunk=request.chunk, kind=kind)
        with self._template_lock:
            text = chat_prompt(self.processor, request)
        data: dict[str, Any] = {}
        kwargs: dict[str, Any] = {"truncation": False}  # Whisper's 30 s cut: a chunk must be heard to the end
        if request.audio is not None:
            data["audio"] = (_as_audio(request.audio), SAMPLE_RATE)
        if request.video is not None:
            data["video"] = _as_video(request.video)
            video = self.processor.video_processor
            min_pixels = (video.patch_size * video.merge_size) ** 2
            kwargs.update(
                fps=float(request.fps or self.settings.fps),  # the time positions of every frame pair
                size={"shortest_edge": min_pixels, "longest_edge": max(self.settings.frame_max_pixels, min_pixels)},
                do_sample_frames=False,  # frames arrive already sampled at ``fps``
                cap_pixels_per_frame=True,
                use_audio_in_video=_audio_in_video(request),
            )
        params = SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=0.0,
            repetition_penalty=self._repetition_penalty,
            allowed_token_ids=self._allowed,
            stop_token_ids=[] if self.fixed_length else sorted(self._stop_ids),
            ignore_eos=self.fixed_length,
            min_tokens=request.max_new_tokens if self.fixed_length else 0,
            detokenize=False,  # decoded here, as the transformers engine does
        )
        inputs: dict[str, Any] = {"prompt": text, "mm_processor_kwargs": kwargs}
        if data:
            inputs["multi_modal_data"] = data
        return inputs, params

    # -- the driving thread --------------------------------------------------------------------------------

    def _drive(self) -> None:
        """Add what arrived, run one scheduler step, hand out what finished; sleep only when nothing runs."""
        running: dict[str, _Row] = {}
        while True:
            with self._condition:
                while not self._incoming and not running and not self._closed:
                    self._condition.wait()
                if self._closed and not self._incoming and not running:
                    return
                incoming, self._incoming = self._incoming, []
            for row in incoming:
                request_id = f"omniq-{next(_IDS)}"
                try:  # vLLM processes the inputs here: a prompt too long for the context is refused alone
                    self._llm.add_request(request_id, row.inputs, row.params)
                except Exception as error:
                    row.future.set_exception(_refused(row.request, error))
                else:
                    running[request_id] = row  # its outputs carry the id given here
            if not running:
                continue
            try:
                outputs = self._llm.step()
            except Exception as error:  # the engine itself failed: every row under way gets the error
                logger.exception("vLLM step failed with %d rows under way", len(running))
                try:
                    self._llm.abort_request(list(running))
                except Exception:  # the engine is already broken; the rows fail either way
                    logger.warning("could not abort the rows of the failed step", exc_info=True)
                for row in running.values():
                    row.future.set_exception(error)
                running.clear()
                continue
            self.steps += 1
            self.most_running = max(self.most_running, len(running))
            for output in outputs:
                if not output.finished or (row := running.pop(output.request_id, None)) is None:
                    continue
                try:
                    row.future.set_result(self._result(row, output))
                except Exception as error:
                    row.future.set_exception(error)

    def _result(self, row: _Row, output: Any) -> GenerationResult:
        if not output.outputs:
            raise ModelError(f"vLLM returned no output for a {row.request.kind} row")
        answer = output.outputs[0]
        stop_ids = set() if self.fixed_length else self._stop_ids
        new_ids, stopped = trim_generated(list(answer.token_ids), row.request.max_new_tokens, stop_ids)
        tokenizer = self.processor.tokenizer
        prompt_ids = list(output.prompt_token_ids or [])
        meta: dict[str, Any] = {
            "finish_reason": "stop" if stopped else "length",
            "audio_tokens": prompt_ids.count(tokenizer.audio_token_id),
            "video_tokens": prompt_ids.count(tokenizer.video_token_id),
            "engine": "vllm",
            "token_ids": new_ids,
        }
        if self.record_prompt_ids:
            meta["prompt_ids"] = prompt_ids
        return GenerationResult(
            text=tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
            new_tokens=len(new_ids),
            prompt_tokens=len(prompt_ids),
            seconds=time.perf_counter() - row.submitted,  # this row's time in vLLM (rows overlap: not a share)
            batch_size=1,
            meta=meta,
        )


def _refused(request: GenerationRequest, error: Exception) -> Exception:
    """vLLM's refusal of one row's inputs (too long for the context, too many frames) as that row's error."""
    refused = ValueError(f"vLLM refused the {request.kind} row: {type(error).__name__}: {error}")
    refused.__cause__ = error
    return refused


def _allowed_ids(generation: Any, vocab: int) -> list[int] | None:
    """The checkpoint's ``suppress_tokens`` (transformers' generate honours them; vLLM's sampler does not) as
    the ids left allowed; ``None`` when nothing is suppressed."""
    suppressed = set(generation.suppress_tokens or [])
    if not suppressed:
        return None
    return [token for token in range(vocab) if token not in suppressed]
