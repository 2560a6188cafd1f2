"""PipelinedEngine on the tiny model: rows from many callers share batches, the next batch is prepared while
one generates, outputs equal one-at-a-time calls, and errors reach only the callers they concern."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.engines.base import GenerationRequest
from pipeline.engines.omni import OmniEngine
from pipeline.engines.pipelined import PipelinedEngine, media_tokens
from pipeline.infer import ChunkBudget
from tests.pipeline.engines.conftest import tiny_settings
from tests.pipeline.engines.test_omni import caption_request, frames, noise, summary_request, tone, transcript_request


class Recorder:
    """Wraps the engine's two stages to record when each batch was prepared and generated, and with which rows."""

    def __init__(self, engine: OmniEngine) -> None:
        self.events: list[tuple[str, float, float, list[GenerationRequest]]] = []
        self.lock = threading.Lock()
        encode, run = engine.encode, engine.run_encoded

        def recorded_encode(requests: Any) -> Any:
            started = time.perf_counter()
            result = encode(requests)
            with self.lock:
                self.events.append(("encode", started, time.perf_counter(), list(requests)))
            return result

        def recorded_run(requests: Any, encoded: Any) -> Any:
            started = time.perf_counter()
            result = run(requests, encoded)
            with self.lock:
                self.events.append(("run", started, time.perf_counter(), list(requests)))
            return result

        engine.encode = recorded_encode  # type: ignore[method-assign]
        engine.run_encoded = recorded_run  # type: ignore[method-assign]

    def batches(self, stage: str = "run") -> list[list[GenerationRequest]]:
        return [rows for name, _, _, rows in self.events if name == stage]


def pipelined(cache: Path, **overrides: Any) -> tuple[PipelinedEngine, Recorder]:
    settings = tiny_settings(cache, **{"batch_gather_ms": 2000.0, **overrides})
    engine = OmniEngine(settings)
    engine.load()
    return PipelinedEngine(engine, settings), Recorder(engine)


def from_threads(engine: PipelinedEngine, requests: list[GenerationRequest]) -> list[Any]:
    """Each request from its own thread, as separate queue messages would submit them."""
    with ThreadPoolExecutor(len(requests)) as callers:
        return list(callers.map(lambda request: engine.generate([request])[0], requests))


def test_rows_of_many_callers_share_batches_and_equal_single_calls(tiny_cache_dir, engine):
    requests = [transcript_request(noise(3.0 + i % 3, seed=i), max_new_tokens=12) for i in range(8)]
    single = [engine.generate([r])[0] for r in requests]
    fed, recorder = pipelined(tiny_cache_dir)
    try:
        answers = from_threads(fed, requests)
    finally:
        fed.close()
    assert [a.text for a in answers] == [s.text for s in single]
    assert [a.new_tokens for a in answers] == [s.new_tokens for s in single]
    assert sorted(len(b) for b in recorder.batches()) == [4, 4]  # 8 callers, batches of 4
    assert fed.stats.batches == 2 and fed.stats.rows == 8 and fed.stats.mean_batch == 4


def test_batches_hold_one_kind_one_fps_and_respect_the_token_cap(tiny_cache_dir):
    video = frames(4, 256, 256)  # 2 frame pairs x 64 tokens; the 2 s audio rows have 25 each
    requests = [
        caption_request(video, fps=1.0, max_new_tokens=4),
        caption_request(video, fps=2.0, max_new_tokens=4),
        caption_request(video, fps=1.0, max_new_tokens=4),
        transcript_request(tone(2.0), max_new_tokens=4),
        summary_request("a talk", max_new_tokens=4),
        transcript_request(tone(2.0), max_new_tokens=4),
    ]
    cap = media_tokens(requests[0], 448 * 448) + 1  # room for one video row per batch
    fed, recorder = pipelined(tiny_cache_dir, batch_gather_ms=300.0, batch_max_media_tokens=cap)
    try:
        answers = from_threads(fed, requests)
    finally:
        fed.close()
    assert all(a.text or a.new_tokens for a in answers)
    for batch in recorder.batches():
        assert len({r.kind for r in batch}) == 1
        assert len({r.fps for r in batch if r.video is not None}) <= 1
        assert sum(media_tokens(r, 448 * 448) for r in batch) <= cap or len(batch) == 1
    kinds = sorted((b[0].kind, len(b)) for b in recorder.batches())
    assert kinds == [("caption", 1), ("caption", 1), ("caption", 1), ("summary", 1), ("transcript", 2)]


def test_the_next_batch_is_prepared_while_one_generates_and_no_more(tiny_cache_dir):
    requests = [caption_request(frames(8, 96, 96, seed=i), audio=tone(4.0), max_new_tokens=16) for i in range(12)]
    fed, recorder = pipelined(tiny_cache_dir, batch_size=2, batch_gather_ms=500.0)
    try:
        from_threads(fed, requests)
    finally:
        fed.close()
    runs = [(start, end) for name, start, end, _ in recorder.events if name == "run"]
    encodes = [(start, end) for name, start, end, _ in recorder.events if name == "encode"]
    assert len(runs) == len(encodes) == 6

    # overlap: every batch but the first was prepared (mostly) while another generated
    def overlapped(start: float, end: float) -> float:
        return sum(max(0.0, min(end, r_end) - max(start, r_start)) for r_start, r_end in runs)

    during = [e for e in encodes[1:] if overlapped(*e) >= 0.5 * (e[1] - e[0])]
    assert len(during) >= 4, (encodes, runs)
    # bounded: a batch is never prepared more than one ahead of the model (ahead=1)
    for e_start, _ in encodes:
        started_runs = sum(1 for r_start, _ in runs if r_start <= e_start)
        prepared = sum(1 for other, _ in encodes if other < e_start)
        assert prepared - started_runs <= 1


def test_an_error_reaches_only_the_rows_of_its_batch(tiny_cache_dir):
    fed, _ = pipelined(tiny_cache_dir, batch_gather_ms=100.0)
    bad = transcript_request(np.zeros((2, 10), dtype=np.float32))  # not mono: the processor refuses it
    bad.kind = "broken"  # its own group, so it does not share a batch with the good rows
    try:
        with ThreadPoolExecutor(2) as callers:
            good = callers.submit(fed.generate, [transcript_request(tone(1.0), max_new_tokens=4)])
            failing = callers.submit(fed.generate, [bad])
            assert good.result(timeout=60)[0].new_tokens > 0
            with pytest.raises(ValueError, match="mono"):
                failing.result(timeout=60)
        assert fed.generate([summary_request("still serving", max_new_tokens=4)])[0].new_tokens > 0
    finally:
        fed.close()


def test_chunk_budget_is_taken_all_at_once_and_never_exceeded():
    budget = ChunkBudget(4)
    held, peak, lock = [0], [0], threading.Lock()

    def work(chunks: int) -> None:
        with budget.reserve(chunks):
            with lock:
                held[0] += min(chunks, 4)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(chunks, 4)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(work, [3, 2, 4, 1, 9, 2, 3, 1]))  # 9 asks for more than the whole budget: it gets all 4
    assert peak[0] <= 4 and held[0] == 0


class Gate:
    """Holds the model's ``generate`` calls until opened, so a test can look at what was prepared meanwhile."""

    def __init__(self, engine: OmniEngine) -> None:
        self.open, self.started = threading.Event(), threading.Event()
        run = engine.run_encoded

        def gated(requests: Any, encoded: Any) -> Any:
            self.started.set()
            assert self.open.wait(timeout=60), "the gate was never opened"
            return run(requests, encoded)

        engine.run_encoded = gated  # type: ignore[method-assign]


def wait_until(condition: Any, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_light_batch_waiting_never_holds_back_the_next_video_batch(tiny_cache_dir):
    fed, recorder = pipelined(tiny_cache_dir, batch_size=2, batch_gather_ms=2000.0)
    gate = Gate(fed.engine)
    video = [caption_request(frames(4, 64, 64, seed=i), max_new_tokens=4) for i in range(6)]
    audio = [transcript_request(tone(1.0 + i), max_new_tokens=4) for i in range(2)]
    pool = ThreadPoolExecutor(10)
    try:
        futures = [pool.submit(fed.generate, [r]) for r in video[:2]]  # a full batch: the model takes it
        assert gate.started.wait(timeout=60)
        futures += [pool.submit(fed.generate, [r]) for r in audio]  # a full batch of light rows, older ...
        assert wait_until(lambda: len(recorder.batches("encode")) == 2)
        futures += [pool.submit(fed.generate, [r]) for r in video[2:4]]  # ... than the next video batch
        # the light batch waits for the model, yet the next video batch is prepared beside it
        assert wait_until(lambda: len(recorder.batches("encode")) == 3)
        futures += [pool.submit(fed.generate, [r]) for r in video[4:]]
        time.sleep(0.5)  # a third video batch is full, but one with video already waits: it is not prepared
        kinds = [batch[0].kind for batch in recorder.batches("encode")]
        assert kinds == ["caption", "transcript", "caption"] and recorder.batches("run") == []
        gate.open.set()
        assert all(f.result(timeout=60)[0].new_tokens > 0 for f in futures)
    finally:
        gate.open.set()
        pool.shutdown()
        fed.close()
    assert sorted(len(b) for b in recorder.batches()) == [2, 2, 2, 2]


def test_a_batch_that_is_not_full_keeps_gathering_while_another_waits_for_the_model(tiny_cache_dir):
    fed, recorder = pipelined(tiny_cache_dir, batch_size=2, batch_gather_ms=100.0)
    gate = Gate(fed.engine)
    pool = ThreadPoolExecutor(6)
    try:
        futures = [pool.submit(fed.generate, [transcript_request(tone(1.0), max_new_tokens=4)]) for _ in range(2)]
        assert gate.started.wait(timeout=60)  # the model is busy with the first batch
        futures += [pool.submit(fed.generate, [summary_request(f"talk {i}", max_new_tokens=4)]) for i in range(2)]
        assert wait_until(lambda: len(recorder.batches("encode")) == 2)  # formed, waiting for the model
        late = [pool.submit(fed.generate, [summary_request("a late row", max_new_tokens=4)])]
        time.sleep(0.5)  # well past its 100 ms window, but a batch already waits for the model: it gathers
        assert len(recorder.batches("encode")) == 2
        late.append(pool.submit(fed.generate, [summary_request("another late row", max_new_tokens=4)]))
        gate.open.set()
        assert all(f.result(timeout=60)[0].new_tokens > 0 for f in futures + late)
    finally:
        gate.open.set()
        pool.shutdown()
        fed.close()
    assert [len(b) for b in recorder.batches()] == [2, 2, 2]  # the late rows went together


def test_callers_hear_when_their_rows_are_prepared_before_they_generate(tiny_cache_dir):
    fed, _ = pipelined(tiny_cache_dir, batch_size=2, batch_gather_ms=50.0)
    gate = Gate(fed.engine)
    prepared = threading.Event()
    caller = ThreadPoolExecutor(1)
    try:
        rows = [transcript_request(tone(1.0), max_new_tokens=4), transcript_request(tone(2.0), max_new_tokens=4)]
        answer = caller.submit(fed.generate, rows, prepared=prepared.set)
        assert prepared.wait(timeout=60) and gate.started.wait(timeout=60) and not answer.done()
        gate.open.set()
        assert len(answer.result(timeout=60)) == 2
    finally:
        gate.open.set()  # before waiting for the caller, which may be held by the gate
        caller.shutdown()
        fed.close()


def test_a_hold_on_the_chunk_budget_is_given_back_once():
    budget = ChunkBudget(4)
    held = budget.hold(3)
    held.release()
    held.release()  # a second release gives nothing back twice
    everything = budget.hold(4)
    with ThreadPoolExecutor(1) as other:
        more = other.submit(budget.hold, 1)
        time.sleep(0.2)
        assert not more.done()  # the budget is 4, not 7
        everything.release()
        more.result(timeout=10).release()


def test_the_next_message_loads_while_the_previous_one_generates(tiny_cache_dir, tmp_path, monkeypatch):
    from pipeline import infer, job
    from pipeline.media.sample import make_sample
    from pipeline.storage import LocalStorage

    # the language is given: detecting it would hold the first message's chunk at the gate too
    settings = tiny_settings(tiny_cache_dir, frame_max_pixels=64 * 64, fps=1.0, batch_gather_ms=50.0, language="en")
    storage = LocalStorage(tmp_path / "store")
    plans = [
        job.ingest(
            job.make_spec(str(make_sample(tmp_path / f"c{i}.mp4", 2.0, size="96x64")), settings), settings, storage
        )
        for i in range(2)
    ]
    loads: list[float] = []
    load = infer.load_chunk_media
    monkeypatch.setattr(infer, "load_chunk_media", lambda *a, **k: loads.append(time.monotonic()) or load(*a, **k))
    fed, _ = pipelined(tiny_cache_dir, batch_gather_ms=50.0)
    gate = Gate(fed.engine)
    budget = ChunkBudget(1)  # one chunk decoded at a time
    messages = ThreadPoolExecutor(2)
    try:
        first = messages.submit(infer.infer_chunks, plans[0], [0], fed, storage, settings, budget)
        assert gate.started.wait(timeout=60)
        second = messages.submit(infer.infer_chunks, plans[1], [0], fed, storage, settings, budget)
        # the first chunk's rows are prepared, so its place in the budget is free while they generate
        assert wait_until(lambda: len(loads) == 2), loads
        assert not first.done()
        gate.open.set()
        assert first.result(timeout=60)[0].transcript is not None and second.result(timeout=60)
    finally:
        gate.open.set()  # before waiting for the messages, which may be held by the gate
        messages.shutdown()
        fed.close()
