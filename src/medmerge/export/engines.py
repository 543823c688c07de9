"""Answer engines: one interface over PyTorch, CTranslate2 and llama.cpp, with token-by-token streaming.

Every engine works on token ids of the model's own tokenizer. Decoding follows a `Decoding` (from
`medmerge.config.answer`); its default, `GREEDY`, is plain argmax at each step (evaluation and the export
agreement checks use it), while `ask` / `serve` answer with `AnswerConfig().decoding` (a repetition penalty
and a stop once the answer loops). Every engine honours every field: repetition penalty (Hugging Face /
CTranslate2 `repetition_penalty`, llama.cpp `repeat_penalty` over the whole context), no-repeat n-grams
(llama.cpp: a logits processor), seeded temperature / top-p sampling.

    prompt_ids(question)                 ids of the chat-templated prompt (causal) or `question: …` (seq2seq)
    stream_ids(prompt, n, decoding)      yields up to n new ids, stopping after eos
    generate_batch(prompts, n, decoding) continuations of several prompts at once, each cut after eos
    score(prompt, cont)                  log p(cont_t | prompt, cont_<t) in nats, one per cont token
    argmax_next(prompt, cont, ban)       argmax_v p(v | prompt, cont_<t) per position t, ids in `ban` excluded

`stream_text` (engine-agnostic) turns ids into text pieces and applies `stop_repeat_tokens`.
`open_engine(model, engine)` picks the backend; "auto" takes the fastest one available for the folder:
CTranslate2 for a CTranslate2 export, llama.cpp (if installed) for a GGUF export, PyTorch otherwise.
Edge engines get their own thread settings (CTranslate2 `intra_threads`, llama.cpp `n_threads`) and never
share a step with torch compute in the answering process (measured 2.7× slower when they compete).
An engine keeps decoding state: one generation at a time per engine (serve queues requests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from medmerge.config.answer import GREEDY, Decoding
from medmerge.errors import MedmergeError
from medmerge.export.common import RepeatWatch, default_threads, llama_cpp_available, read_export_manifest
from medmerge.models import ModelKind

ENGINES = ("auto", "torch", "torch-bf16", "ct2", "llama.cpp")


class Engine(Protocol):
    """What every answer engine offers (see the module docstring for the exact semantics)."""

    name: str
    kind: ModelKind
    tokenizer: Any
    eos: list[int]

    def stream_ids(
        self, prompt: list[int], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> Iterator[int]: ...

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> list[list[int]]: ...

    def score(self, prompt: list[int], cont: list[int]) -> list[float]: ...

    def argmax_next(self, prompt: list[int], cont: list[int], ban: Sequence[int]) -> list[int]: ...


def available_engines(model: str | os.PathLike[str]) -> list[str]:
    """Engines that can run `model` here, fastest first."""
    manifest = read_export_manifest(model) if Path(str(model)).is_dir() else None
    if manifest is None:
        return ["torch", "torch-bf16"]
    if manifest["format"] == "ct2":
        return ["ct2"]
    return (["llama.cpp"] if llama_cpp_available() else []) + ["torch"]


def open_engine(
    model: str | os.PathLike[str],
    engine: str = "auto",
    *,
    threads: int | None = None,
    compute_type: str | None = None,
) -> Engine:
    """Load `model` (embedded name, Hugging Face folder or `medmerge export` folder) into an engine."""
    if engine not in ENGINES:
        raise MedmergeError(f"engine {engine!r}: unknown (choices: {', '.join(ENGINES)})")
    choices = available_engines(model)
    if engine == "auto":
        engine = choices[0]
    elif engine == "llama.cpp" and "torch" in choices and not llama_cpp_available():
        raise MedmergeError(
            "engine 'llama.cpp': llama-cpp-python is not installed (optional; it compiles llama.cpp: "
            "pip install llama-cpp-python)"
        )
    elif engine not in choices:
        raise MedmergeError(
            f"engine {engine!r}: cannot run {model} here (available for it: {', '.join(choices)})"
        )
    manifest = read_export_manifest(model) if Path(str(model)).is_dir() else None
    if engine == "ct2":
        from medmerge.export.ct2_engine import CT2Engine

        return CT2Engine(Path(model), threads=threads or default_threads(), compute_type=compute_type)
    if engine == "llama.cpp":
        from medmerge.export.llamacpp_engine import LlamaCppEngine

        n_ctx = min(2048, manifest.get("context_length") or 2048)
        return LlamaCppEngine(
            Path(model), manifest["gguf_file"], threads=threads or default_threads(), n_ctx=n_ctx
        )
    from medmerge.export.torch_engine import TorchEngine

    dtype = "bfloat16" if engine == "torch-bf16" else "float32"
    gguf_file = manifest["gguf_file"] if manifest else None
    return TorchEngine(model, dtype=dtype, threads=threads, gguf_file=gguf_file)


def prompt_ids(engine: Engine, question: str, system: str | None = None) -> list[int]:
    """Token ids of the prompt for `question`, built with the model's chat template (causal models)."""
    from medmerge.data.prompts import build_prompt

    text = build_prompt(question, engine.kind, engine.tokenizer, system)
    return engine.tokenizer(text, add_special_tokens=engine.kind == "seq2seq")["input_ids"]


class TextStream:
    """The answer's text, piece by piece as tokens arrive (special tokens dropped); once iterated,
    `tokens` holds the answer's ids and `finish_reason` says why it ended: "stop" (eos), "repeat" (the
    last `stop_repeat_tokens` ids repeated earlier ones), "length" (`max_new_tokens` reached) or
    "cancelled" (`cancelled()` turned true: the stream ends at once, the rest of the text unsent).

    Pieces are differences of successive decodes of all ids so far, so multi-token characters and
    byte-level merges come out whole; a piece is held back while it ends in an incomplete character.
    """

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        max_new_tokens: int,
        decoding: Decoding,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        self.engine, self.prompt, self.max_new_tokens = engine, prompt, max_new_tokens
        self.decoding = decoding
        self.cancelled = cancelled  # checked after every token: True ends decoding ("cancelled")
        self.tokens: list[int] = []
        self.finish_reason = "length"

    def __iter__(self) -> Iterator[str]:
        engine, ids, shown = self.engine, [], ""
        self.tokens, self.finish_reason = ids, "length"
        watch = RepeatWatch(self.decoding.stop_repeat_tokens)
        steps = engine.stream_ids(self.prompt, self.max_new_tokens, self.decoding)
        try:
            for token in steps:
                if self.cancelled is not None and self.cancelled():
                    self.finish_reason = "cancelled"
                    return
                ids.append(token)
                if token in engine.eos:
                    self.finish_reason = "stop"
                elif watch.push(token):
                    self.finish_reason = "repeat"
                text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                if self.finish_reason == "repeat":
                    break
                if text.endswith("\ufffd") or len(text) <= len(shown):
                    continue
                yield text[len(shown) :]
                shown = text
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()  # ends the engine's decoding loop early (repeat stop, closed connection)
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown) :]


def stream_text(
    engine: Engine,
    prompt: list[int],
    max_new_tokens: int,
    decoding: Decoding = GREEDY,
    cancelled: Callable[[], bool] | None = None,
) -> TextStream:
    """The answer to `prompt` as a `TextStream` of text pieces (greedy unless `decoding` says otherwise)."""
    return TextStream(engine, prompt, max_new_tokens, decoding, cancelled)


def cut_at_repeat(ids: list[int], n: int, eos: Sequence[int]) -> list[int]:
    """`ids` cut where `stop_repeat_tokens = n` stops a stream (after the first token that completes an
    n-gram the answer already holds)."""
    watch = RepeatWatch(n)
    end = next((i + 1 for i, token in enumerate(ids) if token not in eos and watch.push(token)), len(ids))
    return ids[:end]


def answer_batch(
    engine: Engine, prompts: list[list[int]], max_new_tokens: int, decoding: Decoding = GREEDY
) -> list[list[int]]:
    """The ids `stream_text` would answer each prompt with, decoded as one batch: `generate_batch`, each
    answer then cut where `stop_repeat_tokens` stops it."""
    out = engine.generate_batch(prompts, max_new_tokens, decoding)
    return [cut_at_repeat(ids, decoding.stop_repeat_tokens, engine.eos) for ids in out]
