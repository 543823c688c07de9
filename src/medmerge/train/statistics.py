"""Site statistics of an expert (`medmerge stats`): Gram matrices and diagonal Fisher, for data-aware merges.

What is computed (format: `medmerge.site_stats`), on the expert's own TRAINING questions (the seeded split
it trained on, rebuilt from its manifest and checked against the manifest's split fingerprints):

gram::W    G = Σ_t x_t x_tᵀ over the inputs x_t of the nn.Linear holding W, summed over every non-padding
           token the Linear reads: prompt and answer tokens of a causal model (as RegMean uses all input
           tokens); for seq2seq, encoder tokens for the encoder's Linears and the cross-attention k/v, decoder
           tokens (answer ‖ eos, shifted right) for the decoder's other Linears. Forward pre-hooks, no_grad,
           padded batches (padding rows are masked out, so the sum does not depend on the batch size).
           Each batch's XᵀX is a float32 matmul, added into a float64 sum (see docs/site-statistics.md).
fisher::W  F = (1/n) Σ_i (∂ℓ_i/∂W)², ℓ_i = Σ_k log p(y_k | prompt, y_<k), example i's summed answer
           log-likelihood (the same answer tokens as `medmerge.loss`); one backward pass per example.

A LoRA expert is loaded on its base with the adapter merged in (`medmerge.models.load_model`), so W is the
full weight W₀ + scale·B·A and x the input that both W₀ and the LoRA branch see; ∂ℓ/∂W of the merged
Linear is exactly g_outᵀ x summed over tokens. QLoRA adapters go on the float base (as the merge engine
merges them). Keys are the base model's tensor names: only Linears whose `<module>.weight` is a tensor of
the base model's safetensors are covered (a head tied to the embeddings has none and is skipped).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medmerge.config import TrainConfig, validate_config
from medmerge.config.base import normalised_specs
from medmerge.data import IGNORE_INDEX, pad_batch
from medmerge.errors import MedmergeError
from medmerge.loss import batch_nll, unpin_forwards
from medmerge.models import ModelKind, adapter_base, is_adapter, load_model, load_tokenizer, model_kind
from medmerge.site_stats import KINDS, expert_checksum, has_statistics, write_statistics
from medmerge.train.examples import Example, prepare_data

GRAM_EXAMPLES = 256
FISHER_EXAMPLES = 64


def base_weight_names(expert_dir: Path) -> set[str]:
    """Tensor names of the base model's safetensors (the expert's own for a full model)."""
    from safetensors import safe_open

    from medmerge.models import resolve_model

    folder = resolve_model(adapter_base(expert_dir)) if is_adapter(expert_dir) else expert_dir
    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    if not names:
        raise MedmergeError(f"{folder}: no safetensors weights (expected the expert's base model)")
    return names


def statistic_linears(model: torch.nn.Module, weight_names: set[str]) -> dict[str, torch.nn.Linear]:
    """{base weight name: nn.Linear} of every Linear of `model` whose weight is a base tensor."""
    found = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in weight_names
    }
    if not found:
        raise MedmergeError("no nn.Linear of the model matches a tensor of its base weights")
    return found


@dataclass
class Grams:
    """Gram sums (float64) by stored weight name, the aliases of shared inputs, and token counts."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # weight name → stored weight name
    tokens: dict[str, int] = field(default_factory=dict)  # "input" (causal) or "encoder" / "decoder"

    def float32(self) -> dict[str, torch.Tensor]:
        return {name: g.float() for name, g in self.sums.items()}


class _GramHooks:
    """Forward pre-hooks adding XᵀX of each Linear's non-padding input rows into float64 sums.

    Rows are picked with the mask of the token sequence the input belongs to, found by its (B, T) shape
    (the caller makes encoder and decoder lengths differ). A Linear reading the very tensor object another
    Linear already read in this forward is recorded as that one's alias and not summed again.
    """

    def __init__(self, modules: dict[str, torch.nn.Linear], grams: Grams) -> None:
        self.grams = grams
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.seen: list[tuple[torch.Tensor, str]] = []
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def pre(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            owner = next((stored for t, stored in self.seen if t is x), None)
            if owner is not None:
                if self.grams.aliases.setdefault(name, owner) != owner or name in self.grams.sums:
                    raise MedmergeError(f"{name}: its input is shared differently from batch to batch")
                return
            if name in self.grams.aliases:
                raise MedmergeError(f"{name}: its input is shared differently from batch to batch")
            mask = self.masks.get(tuple(x.shape[:-1]))
            if mask is None:
                raise MedmergeError(f"{name}: input of shape {tuple(x.shape)} matches no token sequence")
            rows = x[mask].float()  # (N, in)
            gram = (rows.T @ rows).double()
            total = self.grams.sums.get(name)
            self.grams.sums[name] = gram if total is None else total.add_(gram)
            self.seen.append((x, name))

        return pre

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _gram_batch(batch: dict[str, torch.Tensor], seq2seq: bool, pad_id: int) -> dict[str, torch.Tensor]:
    """Seq2seq: one more (masked) encoder column where encoder and decoder lengths are equal."""
    if seq2seq and batch["input_ids"].shape[1] == batch["labels"].shape[1]:
        column = torch.full_like(batch["input_ids"][:, :1], pad_id)
        batch["input_ids"] = torch.cat([batch["input_ids"], column], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros_like(column)], dim=1)
    return batch


def _head_free(model: torch.nn.Module, modules: dict[str, torch.nn.Linear]) -> dict[str, int]:
    """{"logits_to_keep": 1} where the head needs no Gram and the forward takes it (no (B, T, V) logits)."""
    import inspect

    head = model.get_output_embeddings()
    if any(m is head for m in modules.values()):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def collect_grams(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Linear],
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> Grams:
    """Gram sums of `modules`' inputs over `examples` (see module doc); model in eval mode."""
    seq2seq = bool(model.config.is_encoder_decoder)
    device = next(model.parameters()).device
    grams = Grams(tokens={"encoder": 0, "decoder": 0} if seq2seq else {"input": 0})
    hooks = _GramHooks(modules, grams)
    keep = _head_free(model, modules)
    ordered = sorted(examples, key=lambda e: (len(e["input_ids"]), len(e["labels"])))  # less padding
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(ordered), batch_size), desc="gram", disable=not progress):
            rows = ordered[start : start + batch_size]
            batch = _gram_batch(pad_batch(rows, pad_id), seq2seq, pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            inputs = batch["attention_mask"].bool()  # (B, T)
            hooks.masks = {tuple(inputs.shape): inputs}
            if seq2seq:
                answers = batch["labels"] != IGNORE_INDEX  # (B, T_dec): decoder positions that exist
                hooks.masks[tuple(answers.shape)] = answers
                grams.tokens["decoder"] += int(answers.sum())
            grams.tokens["encoder" if seq2seq else "input"] += int(inputs.sum())
            extra = {"labels": batch["labels"]} if seq2seq else keep
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
            unpin_forwards(model)
            hooks.seen.clear()
    finally:
        hooks.remove()
        model.train(was_training)
    return grams


def collect_fishers(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Linear],
    examples: Sequence[Example],
    pad_id: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher (float32) of each module's weight: the mean over `examples` of the
    squared gradient of the example's summed answer log-likelihood (one backward pass per example)."""
    if not examples:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    model.requires_grad_(False)
    weights = [m.weight for m in modules.values()]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        for example in tqdm(examples, desc="fisher", disable=not progress):
            batch = {k: v.to(device) for k, v in pad_batch([example], pad_id).items()}
            nll, _ = batch_nll(model, batch)
            grads = torch.autograd.grad(nll, weights)  # ∂(−ℓ)/∂W; squared, the sign goes
            for total, g in zip(sums, grads, strict=True):
                total.addcmul_(g.float(), g.float())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: total / len(examples) for name, total in zip(modules, sums, strict=True)}


def expert_train_config(expert_dir: Path, specs: Sequence[str] | None) -> tuple[TrainConfig, list | None]:
    """The expert's training config (its manifest's; `specs` replace its data SPECs) and the manifest's
    data record (None where the folder has no medmerge manifest)."""
    manifest_path = expert_dir / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MedmergeError(f"{manifest_path}: unreadable manifest ({exc})") from None
    settings = dict(manifest.get("config") or {})
    if not settings and not specs:
        raise MedmergeError(f"{expert_dir}: no medmerge manifest with the training data (pass --data SPEC…)")
    settings["model"] = str(expert_dir)
    if specs:
        settings["data"] = {**settings.get("data", {}), "specs": normalised_specs(list(specs))}
    config = validate_config(settings, TrainConfig, str(manifest_path))
    return config, (manifest.get("inputs") or {}).get("data")


def _check_same_split(sources: list[dict[str, Any]], recorded: list | None, expert_dir: Path) -> None:
    if not recorded:
        return
    want = sorted(r.get("train_fingerprint") for r in recorded)
    have = sorted(s["train_fingerprint"] for s in sources)
    if want != have:
        raise MedmergeError(
            f"{expert_dir / 'manifest.json'}: the expert trained on other questions than "
            f"{', '.join(s['spec'] for s in sources)} give (training-split fingerprints differ; pass the "
            "SPECs it trained on)"
        )


def compute_statistics(
    expert_dir: str | Path,
    specs: Sequence[str] | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    max_examples: int | None = None,
    fisher_examples: int | None = None,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Path:
    """Compute `kinds` statistics of the expert in `expert_dir` on its training questions; write them
    into `out_dir` (default: the expert folder) and return that folder.

    `specs` default to the SPECs of the expert's manifest. Up to `max_examples` training questions are
    used (default 256 for the Gram, 64 for the Fisher; `fisher_examples` sets the Fisher's apart). They
    are a seeded sample (the config's seed) of the split; the Fisher's are the first of the Gram's.
    """
    expert_dir = Path(expert_dir)
    out = Path(out_dir) if out_dir is not None else expert_dir
    kinds = list(dict.fromkeys(kinds))
    if not kinds or any(k not in KINDS for k in kinds):
        raise MedmergeError(f"kinds: {kinds} (expected one or more of {', '.join(KINDS)})")
    if min(max_examples or 1, fisher_examples or 1, batch_size) < 1:
        raise MedmergeError("max_examples, fisher_examples, batch_size: expected positive numbers")
    if has_statistics(out) and not overwrite:
        raise MedmergeError(f"{out}: already holds statistics (pass --overwrite to replace them)")
    if not expert_dir.is_dir():
        raise MedmergeError(f"{expert_dir}: not a folder (expected an expert folder)")
    config, recorded = expert_train_config(expert_dir, specs)
    kind: ModelKind = model_kind(expert_dir)
    tokenizer = load_tokenizer(expert_dir)
    data = prepare_data(config, tokenizer, kind)
    _check_same_split(data.sources, recorded, expert_dir)

    n_gram = min(len(data.train), max_examples or GRAM_EXAMPLES) if "gram" in kinds else 0
    n_fisher = min(len(data.train), fisher_examples or max_examples or FISHER_EXAMPLES)
    n_fisher = n_fisher if "fisher" in kinds else 0
    order = random.Random(config.seed).sample(range(len(data.train)), max(n_gram, n_fisher))
    picked = [data.train[i] for i in order]  # Gram: the first n_gram, Fisher: the first n_fisher

    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(expert_dir).to(resolved)
    modules = statistic_linears(model, base_weight_names(expert_dir))
    pad_id = tokenizer.pad_token_id
    grams = (
        collect_grams(model, modules, picked[:n_gram], pad_id, batch_size, progress) if n_gram else Grams()
    )
    gram_tensors = grams.float32()  # the float64 sums go before the Fisher pass needs its memory
    grams.sums.clear()
    fishers = collect_fishers(model, modules, picked[:n_fisher], pad_id, progress)
    info = {
        "examples": len(picked),
        "tokens": sum(grams.tokens.values()),
        "per_kind": {
            **({"gram": {"examples": n_gram, "tokens": grams.tokens}} if "gram" in kinds else {}),
            **({"fisher": {"examples": n_fisher}} if "fisher" in kinds else {}),
        },
        "data": {
            "split": "train",
            "sources": data.sources,  # SPEC, file checksum, split seed/fractions/sizes, fingerprints
            "sample_seed": config.seed,
            "max_prompt_tokens": config.max_prompt_tokens,
            "max_answer_tokens": config.max_answer_tokens,
            "system_prompt": config.system_prompt is not None,
        },
        "model": {
            "path": str(expert_dir.resolve()),
            "kind": kind,
            "adapter": is_adapter(expert_dir),
            "base_model": adapter_base(expert_dir) if is_adapter(expert_dir) else None,
            "checksum": expert_checksum(expert_dir),
        },
        "tokens_counted": "non-padding input tokens (causal: prompt + answer; seq2seq: encoder + decoder)",
    }
    write_statistics(out, gram_tensors, fishers, info, aliases=grams.aliases)
    return out
