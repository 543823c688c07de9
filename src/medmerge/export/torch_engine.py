"""The PyTorch answer engine: a Hugging Face folder (float32 or bfloat16), or a GGUF file dequantized by
transformers (which checks the file's weights, not llama.cpp's runtime)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from medmerge.export.common import eos_ids, until_eos
from medmerge.models import ModelKind


class TorchEngine:
    """Greedy decoding with a KV cache, one token per forward pass after the prompt."""

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
    def stream_ids(self, prompt: list[int], max_new_tokens: int, ban: Sequence[int] = ()) -> Iterator[int]:
        """Greedy ids one at a time (KV cache), stopping after eos or `max_new_tokens`.

        Ids in `ban` are never chosen (banning eos gives exactly `max_new_tokens` ids).
        """
        ids = torch.tensor([prompt])
        if self.kind == "seq2seq":
            encoder_outputs = self.model.get_encoder()(input_ids=ids)
            step = torch.tensor([[self.start_id]])
            kwargs = {"encoder_outputs": encoder_outputs}
        else:
            step, kwargs = ids, {}
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
            token = int(logits.argmax())
            yield token
            if token in self.eos:
                return
            step = torch.tensor([[token]])

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of a batch (left-padded for causal models), each cut after eos."""
        from medmerge.data.prompts import pad_batch

        side = "right" if self.kind == "seq2seq" else "left"
        batch = pad_batch([{"input_ids": p} for p in prompts], self.tokenizer.pad_token_id, side)
        out = self.model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos,
        )
        start = 1 if self.kind == "seq2seq" else batch["input_ids"].shape[1]
        return [until_eos(row[start:].tolist(), self.eos) for row in out]
