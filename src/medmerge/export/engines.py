"""Answer engines: one interface over PyTorch, CTranslate2 and llama.cpp, with token-by-token streaming.

Every engine works on token ids of the model's own tokenizer and decodes greedily (argmax at each step):

    prompt_ids(question)            ids of the chat-templated prompt (causal) or `question: …` (seq2seq)
    stream_ids(prompt, n)           yields up to n new ids, stopping after eos
    generate_batch(prompts, n)      greedy continuations of several prompts at once
    score(prompt, cont)             log p(cont_t | prompt, cont_<t) in nats, one per cont token
    argmax_next(prompt, cont, ban)  argmax_v p(v | prompt, cont_<t) per position t, ids in `ban` excluded

`open_engine(model, engine)` picks the backend; "auto" takes the fastest one available for the folder:
CTranslate2 for a CTranslate2 export, llama.cpp (if installed) for a GGUF export, PyTorch otherwise.
Edge engines get their own thread settings (CTranslate2 `intra_threads`, llama.cpp `n_threads`) and never
share a step with torch compute in the answering process (measured 2.7× slower when they compete).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from medmerge.errors import MedmergeError
from medmerge.export.common import default_threads, llama_cpp_available, read_export_manifest
from medmerge.models import ModelKind

ENGINES = ("auto", "torch", "torch-bf16", "ct2", "llama.cpp")


class Engine(Protocol):
    """What every answer engine offers (see the module docstring for the exact semantics)."""

    name: str
    kind: ModelKind
    tokenizer: Any
    eos: list[int]

    def stream_ids(self, prompt: list[int], max_new_tokens: int) -> Iterator[int]: ...

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]: ...

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


def stream_text(engine: Engine, prompt: list[int], max_new_tokens: int) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens arrive (special tokens dropped).

    Pieces are differences of successive decodes of all ids so far, so multi-token characters and
    byte-level merges come out whole; a piece is held back while it ends in an incomplete character.
    """
    ids: list[int] = []
    shown = ""
    for token in engine.stream_ids(prompt, max_new_tokens):
        ids.append(token)
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(shown):
            continue
        yield text[len(shown) :]
        shown = text
    text = engine.tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown) :]
