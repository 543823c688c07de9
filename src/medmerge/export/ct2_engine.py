"""The CTranslate2 answer engine: `Generator` for causal models, `Translator` for T5-style models.

It runs with its own `intra_threads` (default: every CPU this process may use) and one inter-op worker;
no torch compute happens in between its steps, so its thread pool does not compete with torch's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medmerge.config.answer import GREEDY, Decoding
from medmerge.errors import MedmergeError
from medmerge.export.common import eos_ids, read_export_manifest, until_eos
from medmerge.models import ModelKind


def cpu_compute_type(quantization: str) -> str:
    """The compute type to run a model stored as `quantization` on this CPU ("default" if unsupported)."""
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types("cpu")
    return quantization if quantization in supported else "default"


def decoding_options(decoding: Decoding) -> dict[str, float | int]:
    """CTranslate2's decoding options for `decoding` (sampling: full vocabulary, then top-p)."""
    options: dict[str, float | int] = {
        "repetition_penalty": decoding.repetition_penalty,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
        "sampling_topk": 1,
    }
    if decoding.sampling:
        import ctranslate2

        # best effort: CTranslate2's worker threads keep their own generators, so a seed does not make its
        # sampling repeatable (OpenNMT/CTranslate2#1757); torch and llama.cpp sampling is repeatable
        ctranslate2.set_random_seed(decoding.seed)
        options.update(
            sampling_topk=0, sampling_topp=decoding.top_p, sampling_temperature=decoding.temperature
        )
    return options


class CT2Engine:
    """Decoding with CTranslate2 on the CPU (its own penalties and sampler)."""

    def __init__(self, folder: Path, *, threads: int, compute_type: str | None = None) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        manifest = read_export_manifest(folder)
        if manifest is None or manifest.get("format") != "ct2":
            raise MedmergeError(f"{folder}: not a CTranslate2 export (no ct2 medmerge-export.json)")
        self.name = "ct2"
        self.kind: ModelKind = manifest["model_kind"]
        self.compute_type = compute_type or cpu_compute_type(manifest["quantization"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos = eos_ids(self.tokenizer, manifest.get("eos_token_id"))
        cls = ctranslate2.Translator if self.kind == "seq2seq" else ctranslate2.Generator
        self.model = cls(
            str(folder), device="cpu", compute_type=self.compute_type, intra_threads=threads, inter_threads=1
        )
        self._eos_tokens = self.tokenizer.convert_ids_to_tokens(self.eos)

    def _tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def score(self, prompt: list[int], cont: list[int]) -> list[float]:
        """log p(cont_t | prompt, cont_<t) in nats (CTranslate2's score_batch)."""
        if self.kind == "seq2seq":  # Translator scores cont followed by eos: drop the eos entry
            result = self.model.score_batch([self._tokens(prompt)], [self._tokens(cont)])[0]
            return list(result.log_probs[: len(cont)])
        result = self.model.score_batch([self._tokens(prompt + cont)])[0]  # scores tokens[1:]
        return list(result.log_probs[len(prompt) - 1 :])

    def argmax_next(self, prompt: list[int], cont: list[int], ban: Sequence[int]) -> list[int]:
        """Teacher-forced argmax at each cont position, ids in `ban` excluded."""
        if self.kind == "causal":
            logits = np.array(self.model.forward_batch([prompt + cont[:-1]]))[0]  # (T, V)
            logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(cont)].astype(np.float64)
            if ban:
                logits[:, list(ban)] = -np.inf
            return logits.argmax(-1).tolist()
        # Translator has no forward pass: decode one token after each reference prefix.
        ban_tokens = [[t] for t in self._tokens(ban)]
        source = self._tokens(prompt)
        out = []
        for t in range(len(cont)):
            prefix = self._tokens(cont[:t])
            hyp = self.model.translate_batch(
                [source],
                target_prefix=[prefix],
                beam_size=1,
                max_decoding_length=t + 1,
                suppress_sequences=ban_tokens or None,
            )[0].hypotheses[0]
            out.append(self.tokenizer.convert_tokens_to_ids(hyp[t]) if len(hyp) > t else -1)
        return out

    def stream_ids(
        self, prompt: list[int], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> Iterator[int]:
        """Ids as CTranslate2 produces them, stopping after eos."""
        options = decoding_options(decoding)
        if self.kind == "seq2seq":
            steps = self.model.generate_tokens(
                self._tokens(prompt), max_decoding_length=max_new_tokens, end_token=[], **options
            )
        else:
            steps = self.model.generate_tokens(
                self._tokens(prompt), max_length=max_new_tokens, end_token=[], **options
            )
        for step in steps:
            yield step.token_id
            if step.token_id in self.eos:
                return

    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> list[list[int]]:
        """Continuations of a batch, each cut after eos (sampling: prompt by prompt, each from the seed)."""
        if decoding.sampling:
            return [until_eos(list(self.stream_ids(p, max_new_tokens, decoding)), self.eos) for p in prompts]
        options = decoding_options(decoding)
        tokens = [self._tokens(p) for p in prompts]
        if self.kind == "seq2seq":
            options.pop("sampling_topk")
            results = self.model.translate_batch(
                tokens, beam_size=1, max_decoding_length=max_new_tokens, end_token=self._eos_tokens, **options
            )
            return [
                until_eos(self.tokenizer.convert_tokens_to_ids(r.hypotheses[0]), self.eos) for r in results
            ]
        results = self.model.generate_batch(
            tokens,
            max_length=max_new_tokens,
            end_token=self._eos_tokens,
            include_prompt_in_result=False,
            **options,
        )
        return [until_eos(r.sequences_ids[0], self.eos) for r in results]
