"""Prompt templates per output kind, versioned: a change here changes job ids and outputs.

Each builder returns a :class:`GenerationRequest` in the transformers multimodal chat format.
Media come before the instruction and there is no system prompt, as in Qwen3-Omni's published
ASR recipe; decoding is greedy (see the engine).
"""

from __future__ import annotations

import math
import re

import numpy as np

from pipeline import languages
from pipeline.engines.base import GenerationRequest

PROMPT_VERSION = "2026-12-01.1"

TRANSCRIPT = "transcript"
CAPTION = "caption"
CHUNK_SUMMARY = "chunk_summary"
LANGUAGE = "language"
TOKENS_PER_SECOND = 8.0  # a transcript row may write this many tokens per second of speech (fast speech: ~5) ...
TOKEN_MARGIN = 16  # ... plus this many
FILE_SUMMARY = "file_summary"


def row_kind(kind: str) -> str | None:
    """The row a request is, as failed rows and failpoints name it (``summary`` for a chunk's summary); None for a
    request that is not a row of the results (the language question)."""
    return {CHUNK_SUMMARY: "summary", LANGUAGE: None}.get(kind, kind)


def _user(content: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{"role": "user", "content": content}]


def transcript_request(audio: np.ndarray, language: str | None, max_new_tokens: int) -> GenerationRequest:
    """ASR on one utterance: "Transcribe the <language> audio into text." (``language``: an ISO 639-1 code)."""
    name = languages.name_of(language) if language else None
    instruction = f"Transcribe the {name} audio into text." if name else "Transcribe the audio into text."
    messages = _user([{"type": "audio"}, {"type": "text", "text": instruction}])
    return GenerationRequest(kind=TRANSCRIPT, messages=messages, audio=audio, max_new_tokens=max_new_tokens)


def transcript_tokens(seconds: float, ceiling: int) -> int:
    """``max_new_tokens`` for an utterance of ``seconds``: a generous speech rate plus a margin, so a model
    cannot ramble for hundreds of tokens over two seconds of speech (never above the configured ceiling)."""
    return max(1, min(ceiling, math.ceil(seconds * TOKENS_PER_SECOND) + TOKEN_MARGIN))


LANGUAGE_INSTRUCTION = "Which language is spoken in this audio? Answer with its ISO 639-1 code only, for example: en."


def language_request(audio: np.ndarray) -> GenerationRequest:
    """Which language a file's first speech is in; the answer is read by ``languages.parse_answer``."""
    messages = _user([{"type": "audio"}, {"type": "text", "text": LANGUAGE_INSTRUCTION}])
    return GenerationRequest(kind=LANGUAGE, messages=messages, audio=audio, max_new_tokens=8)


CAPTION_INSTRUCTION_AV = (
    "Describe this clip in two lines. First line starts with 'Visual:' and says what is seen. "
    "Second line starts with 'Audio:' and says what is heard besides speech (music, sounds, voices)."
)
CAPTION_INSTRUCTION_V = "Describe what is seen in this clip in one or two sentences."
CAPTION_INSTRUCTION_A = "Describe what is heard in this audio besides the words: music, sounds, voices."


def caption_request(
    frames: np.ndarray | None, fps: float, audio: np.ndarray | None, max_new_tokens: int
) -> GenerationRequest:
    """Caption one chunk from its frames and, when present, the soundtrack of those frames."""
    if frames is not None and audio is not None:
        content = [{"type": "video"}, {"type": "text", "text": CAPTION_INSTRUCTION_AV}]
        return GenerationRequest(
            kind=CAPTION,
            messages=_user(content),
            video=frames,
            fps=fps,
            audio=audio,
            use_audio_in_video=True,
            max_new_tokens=max_new_tokens,
        )
    if frames is not None:
        content = [{"type": "video"}, {"type": "text", "text": CAPTION_INSTRUCTION_V}]
        return GenerationRequest(
            kind=CAPTION, messages=_user(content), video=frames, fps=fps, max_new_tokens=max_new_tokens
        )
    if audio is not None:
        content = [{"type": "audio"}, {"type": "text", "text": CAPTION_INSTRUCTION_A}]
        return GenerationRequest(kind=CAPTION, messages=_user(content), audio=audio, max_new_tokens=max_new_tokens)
    raise ValueError("caption_request needs frames, audio or both")


def parse_caption(text: str, has_video: bool, has_audio: bool) -> tuple[str, str]:
    """Split a caption answer into (visual, audio) parts.

    With both streams the model is asked for 'Visual:' and 'Audio:' lines; when it does not
    follow the format the whole answer is kept as the visual caption rather than dropped.
    """
    text = text.strip()
    if has_video and has_audio:
        match = re.search(r"visual:\s*(?P<v>.*?)\s*audio:\s*(?P<a>.*)", text, flags=re.IGNORECASE | re.DOTALL)
        if match:
            return match.group("v").strip(), match.group("a").strip()
        return text, ""
    if has_video:
        return text, ""
    return "", text


def chunk_summary_request(
    start: float, end: float, transcript: str, visual: str, audio: str, max_new_tokens: int
) -> GenerationRequest:
    """Summarise one chunk from what was already written for it (text only: no media tokens again)."""
    parts = [f"This is the part of a recording from {start:.1f}s to {end:.1f}s."]
    if transcript:
        parts.append(f"Speech: {transcript}")
    if visual:
        parts.append(f"What is seen: {visual}")
    if audio:
        parts.append(f"What is heard: {audio}")
    parts.append("Summarise this part in one or two sentences.")
    messages = _user([{"type": "text", "text": "\n".join(parts)}])
    return GenerationRequest(kind=CHUNK_SUMMARY, messages=messages, max_new_tokens=max_new_tokens)


def file_summary_request(chunk_summaries: list[tuple[float, float, str]], max_new_tokens: int) -> GenerationRequest:
    """Summarise a whole file from its chunk summaries, in time order."""
    lines = [f"[{start:.0f}s-{end:.0f}s] {text}" for start, end, text in chunk_summaries if text]
    body = "\n".join(lines) if lines else "(no content was recognised)"
    instruction = (
        "These are summaries of consecutive parts of one recording:\n"
        f"{body}\n"
        "Write a short summary of the whole recording: what it is about, who or what appears, and the main points."
    )
    messages = _user([{"type": "text", "text": instruction}])
    return GenerationRequest(kind=FILE_SUMMARY, messages=messages, max_new_tokens=max_new_tokens)
