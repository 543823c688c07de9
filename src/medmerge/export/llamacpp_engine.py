"""The llama.cpp answer engine (optional: needs the llama-cpp-python package, which builds from source).

Runs a GGUF export with llama.cpp's own kernels (quantized matmuls), `threads` threads for both prompt and
generation, on token ids of the model's Hugging Face tokenizer (so prompts match the other engines token for
token). Decoding is greedy by default; a `Decoding` maps to llama.cpp's `temperature`, `top_p` and seeded
sampler, and to a logits processor for the repetition penalty and no-repeat n-grams on the answer's ids
(llama.cpp's own `repeat_penalty` would also penalize the prompt's tokens; torch and CTranslate2 do not).
Scoring (export checks) uses a second context that keeps all positions' logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medmerge.config.answer import GREEDY, Decoding
from medmerge.errors import MedmergeError
from medmerge.export.common import banned_ngram_tokens, eos_ids, llama_cpp_available, until_eos
from medmerge.models import ModelKind


def answer_processor(decoding: Decoding, prompt_length: int):
    """A llama-cpp-python logits processor applying the repetition penalty and the n-gram ban to the answer's
    ids (the context after the prompt), as the other engines do; None when `decoding` needs neither."""
    penalty, n = decoding.repetition_penalty, decoding.no_repeat_ngram_size
    if penalty == 1.0 and n == 0:
        return None

    def process(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        answer = [int(t) for t in input_ids[prompt_length:]]
        if penalty != 1.0 and answer:
            seen = np.unique(answer)
            scores[seen] = np.where(scores[seen] < 0, scores[seen] * penalty, scores[seen] / penalty)
        banned = banned_ngram_tokens(answer, n)
        if banned:
            scores[banned] = -np.inf
        return scores

    return process


def generate_options(decoding: Decoding, prompt_length: int) -> dict:
    """Keyword arguments of `Llama.generate` for `decoding` (its own repeat_penalty, which also sees the
    prompt, stays off: the penalty is applied by `answer_processor`)."""
    options: dict = {"repeat_penalty": 1.0, "top_k": 1, "temp": 0.0}
    if decoding.sampling:
        options.update(top_k=0, top_p=decoding.top_p, temp=decoding.temperature)
    process = answer_processor(decoding, prompt_length)
    if process is not None:
        from llama_cpp import LogitsProcessorList

        options["logits_processor"] = LogitsProcessorList([process])
    return options


class LlamaCppEngine:
    """Decoding with llama.cpp on the CPU."""

    def __init__(self, folder: Path, gguf_file: str, *, threads: int, n_ctx: int = 2048) -> None:
        if not llama_cpp_available():
            raise MedmergeError("engine 'llama.cpp': llama-cpp-python is not installed (pip install it)")
        from llama_cpp import Llama
        from transformers import AutoTokenizer

        self.name = "llama.cpp"
        self.kind: ModelKind = "causal"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos = eos_ids(self.tokenizer)
        self._args = {
            "model_path": str(folder / gguf_file),
            "n_ctx": n_ctx,
            "n_threads": threads,
            "n_threads_batch": threads,  # llama-cpp-python's default is every CPU of the host
            "verbose": False,
        }
        self.model = Llama(**self._args)
        self._scorer = None  # a second context keeping every position's logits (n_ctx × V floats)

    def _log_probs(self, prompt: list[int], cont: list[int]) -> np.ndarray:
        """(len(cont), V) float64 log-probabilities of the token at each cont position."""
        from llama_cpp import Llama

        if self._scorer is None:
            self._scorer = Llama(**self._args, logits_all=True)
        self._scorer.reset()
        self._scorer.eval(prompt + cont[:-1])
        logits = np.array(self._scorer.scores[len(prompt) - 1 : len(prompt) - 1 + len(cont)], np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    def score(self, prompt: list[int], cont: list[int]) -> list[float]:
        logp = self._log_probs(prompt, cont)
        return [float(logp[t, tok]) for t, tok in enumerate(cont)]

    def argmax_next(self, prompt: list[int], cont: list[int], ban: Sequence[int]) -> list[int]:
        logp = self._log_probs(prompt, cont)
        if ban:
            logp[:, list(ban)] = -np.inf
        return logp.argmax(-1).tolist()

    def stream_ids(
        self, prompt: list[int], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> Iterator[int]:
        self.model.reset()
        if decoding.sampling:
            self.model.set_seed(decoding.seed)
        steps = self.model.generate(prompt, reset=True, **generate_options(decoding, len(prompt)))
        for n, token in enumerate(steps):
            yield int(token)
            if token in self.eos or n + 1 >= max_new_tokens:
                return

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> list[list[int]]:
        """One prompt after the other (llama-cpp-python's high-level API decodes one sequence)."""
        return [until_eos(list(self.stream_ids(p, max_new_tokens, decoding)), self.eos) for p in prompts]
