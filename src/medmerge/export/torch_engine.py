"""The PyTorch answer engine: a Hugging Face folder (float32 or bfloat16), or a GGUF file dequantized by
transformers (which checks the file's weights, not llama.cpp's runtime)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from medmerge.config.answer import GREEDY, Decoding
from medmerge.export.common import eos_ids, until_eos
from medmerge.models import ModelKind


def logits_processors(decoding: Decoding) -> list:
    """Hugging Face's logits processors for `decoding`, in `generate`'s order (penalties, then warpers)."""
    from transformers import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    out: list = []
    if decoding.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty))
    if decoding.no_repeat_ngram_size > 0:
        out.append(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size))
    if decoding.sampling:
        out.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_p < 1.0:
            out.append(TopPLogitsWarper(decoding.top_p))
    return out


class TokenChooser:
    """Picks one answer's next tokens under `decoding`, from the answer's own ids (penalties and n-gram
    bans look at the answer, not the prompt, as CTranslate2 does) and, when sampling, its own generator
    seeded with `decoding.seed`."""

    def __init__(self, decoding: Decoding) -> None:
        self.processors = logits_processors(decoding)
        self.sampler = torch.Generator().manual_seed(decoding.seed) if decoding.sampling else None
        self.plain = not self.processors and self.sampler is None

    def __call__(self, answer: torch.Tensor, logits: torch.Tensor) -> int:
        """The next id after the answer's ids `answer` (1, T), given the model's `logits` (V,)."""
        if self.plain:
            return int(logits.argmax())
        scores = logits.float()[None]
        for processor in self.processors:
            scores = processor(answer, scores)
        if self.sampler is not None:
            return int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=self.sampler))
        return int(scores[0].argmax())


class RowChoices:
    """A `generate` logits processor that lets one `TokenChooser` per row pick its token (every other id
    gets -inf, so greedy search takes it): a padded batch decodes as each prompt alone would.
    `start` is where the answers begin in `generate`'s ids (the padded prompt width, or 1 for seq2seq)."""

    def __init__(self, decoding: Decoding, rows: int, start: int) -> None:
        self.choosers = [TokenChooser(decoding) for _ in range(rows)]
        self.start = start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, -torch.inf)
        for row, choose in enumerate(self.choosers):
            out[row, choose(input_ids[row : row + 1, self.start :], scores[row])] = 0.0
        return out


class TorchEngine:
    """Decoding with a KV cache, one token per forward pass after the prompt; a `Decoding` is applied with
    Hugging Face's logits processors to the answer's ids (see `TokenChooser`)."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        threads: int | None = None,
        gguf_file: str | None = None,
    ) -> None:
        from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model

        if threads:
            torch.set_num_threads(threads)
        if gguf_file:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = Path(model)
            self.kind: ModelKind = "causal"
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf_file, dtype=getattr(torch, dtype)
            )
            self.name = "torch-gguf"
        else:
            path = resolve_model(model)
            self.kind = model_kind(path)
            self.tokenizer = load_tokenizer(path)
            self.model = load_model(path, dtype=dtype)
            self.name = "torch" if dtype == "float32" else "torch-bf16"
        self.model.eval()
        self.eos = eos_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.start_id = self.model.config.decoder_start_token_id if self.kind == "seq2seq" else None

    # ------------------------------------------------------------------------------------ logits

    @torch.no_grad()
    def _log_probs(self, prompt: list[int], cont: list[int]) -> torch.Tensor:
        """(len(cont), V) float32 log-probabilities of the token at each cont position."""
        ids = torch.tensor([prompt])
        if self.kind == "seq2seq":
            dec = torch.tensor([[self.start_id, *cont[:-1]]]) if cont else torch.tensor([[self.start_id]])
            logits = self.model(input_ids=ids, decoder_input_ids=dec).logits[0]  # (T_dec, V)
            return torch.log_softmax(logits.float(), -1)[: len(cont)]
        full = torch.tensor([prompt + cont[:-1]]) if cont else ids
        logits = self.model(input_ids=full).logits[0]  # (T, V)
        return torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : len(prompt) - 1 + len(cont)]

    def score(self, prompt: list[int], cont: list[int]) -> list[float]:
        """log p(cont_t | prompt, cont_<t) in nats."""
        logp = self._log_probs(prompt, cont)  # (N, V)
        return logp.gather(1, torch.tensor(cont)[:, None])[:, 0].tolist()

    def argmax_next(self, prompt: list[int], cont: list[int], ban: Sequence[int]) -> list[int]:
        """Teacher-forced argmax at each cont position, ids in `ban` excluded."""
        logp = self._log_probs(prompt, cont)
        if ban:
            logp[:, list(ban)] = -torch.inf
        return logp.argmax(-1).tolist()

    # -------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def stream_ids(
        self,
        prompt: list[int],
        max_new_tokens: int,
        decoding: Decoding = GREEDY,
        *,
        ban: Sequence[int] = (),
    ) -> Iterator[int]:
        """Ids one at a time (KV cache), stopping after eos or `max_new_tokens`.

        Ids in `ban` are never chosen (banning eos gives exactly `max_new_tokens` ids); `decoding` is
        applied by a `TokenChooser` (penalties see the answer so far; sampling is seeded per answer).
        """
        choose = TokenChooser(decoding)
        ids = torch.tensor([prompt])
        if self.kind == "seq2seq":
            encoder_outputs = self.model.get_encoder()(input_ids=ids)
            step = torch.tensor([[self.start_id]])
            kwargs = {"encoder_outputs": encoder_outputs}
        else:
            step, kwargs = ids, {}
        answer = torch.zeros((1, 0), dtype=torch.long)
        past = None
        for _ in range(max_new_tokens):
            if self.kind == "seq2seq":
                out = self.model(decoder_input_ids=step, past_key_values=past, use_cache=True, **kwargs)
            else:
                out = self.model(input_ids=step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]  # (V,)
            if ban:
                logits[list(ban)] = -torch.inf
            token = choose(answer, logits)
            yield token
            if token in self.eos:
                return
            step = torch.tensor([[token]])
            if choose.processors:
                answer = torch.cat([answer, step], 1)

    @torch.no_grad()
    def generate_batch(
        self, prompts: list[list[int]], max_new_tokens: int, decoding: Decoding = GREEDY
    ) -> list[list[int]]:
        """Continuations of a batch in one padded `generate` call (left-padded for causal models), each cut
        after eos; other settings than plain argmax pick each row's tokens with `RowChoices`."""
        from transformers import LogitsProcessorList

        from medmerge.data.prompts import pad_batch

        side = "right" if self.kind == "seq2seq" else "left"
        batch = pad_batch([{"input_ids": p} for p in prompts], self.tokenizer.pad_token_id, side)
        start = 1 if self.kind == "seq2seq" else batch["input_ids"].shape[1]
        choices = [] if decoding.plain_argmax else [RowChoices(decoding, len(prompts), start)]
        out = self.model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos,
            logits_processor=LogitsProcessorList(choices),
        )
        return [until_eos(row[start:].tolist(), self.eos) for row in out]
