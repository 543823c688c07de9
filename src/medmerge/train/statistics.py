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
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from medmerge.config import TrainConfig, validate_config
from medmerge.config.base import normalised_specs
from medmerge.data import IGNORE_INDEX
from medmerge.errors import MedmergeError
from medmerge.loss import token_nll, unpin_forwards
from medmerge.models import ModelKind, adapter_base, is_adapter, load_model, load_tokenizer, model_kind
from medmerge.site_stats import KINDS, expert_checksum, has_statistics, write_statistics
from medmerge.train.examples import Example, prepare_data
from medmerge.train.private_stats import ClipSettings, collect_clipped_grams, spectral_norms, unit_sample
from medmerge.train.stat_hooks import (
    FisherHooks,
    GramHooks,
    Grams,
    add_counts,
    head_free,
    new_grams,
    token_batches,
)

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


def _gram_forwards(model, modules, examples, pad_id, batch_size, progress, grams: Grams) -> None:
    """Add the Grams of `examples` into `grams`: inference-mode forwards, Gram pre-hooks."""
    seq2seq = bool(model.config.is_encoder_decoder)
    device = next(model.parameters()).device
    hooks = GramHooks(modules, grams)
    keep = head_free(model, modules)
    total = -(-len(examples) // batch_size)
    try:
        with torch.inference_mode():
            batches = token_batches(examples, batch_size, seq2seq, pad_id, device)
            for batch, masks, counts in tqdm(batches, total=total, desc="gram", disable=not progress):
                hooks.new_batch(masks)
                add_counts(grams, counts)
                extra = {"labels": batch["labels"]} if seq2seq else keep
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
                unpin_forwards(model)
    finally:
        hooks.remove()


def collect_grams(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Linear],
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> Grams:
    """Gram sums of `modules`' inputs over `examples` (see module doc); model in eval mode."""
    grams = new_grams(bool(model.config.is_encoder_decoder))
    was_training = model.training
    model.eval()
    try:
        _gram_forwards(model, modules, examples, pad_id, batch_size, progress, grams)
    finally:
        model.train(was_training)
    return grams


def _summed_answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], head_hooked: bool):
    """Σ over the batch's answer tokens of −log p. Where the output head has statistics of its own, the
    model returns full logits, so the head runs once on every position (B, T, C), as the Gram pass and
    the per-example Fisher hooks need; else the head runs on answer positions only (`token_nll`)."""
    if model.config.is_encoder_decoder or not head_hooked:
        nll, _ = token_nll(model, batch)
        return nll.sum()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    flat = logits.reshape(-1, logits.size(-1)).float()
    cross_entropy = torch.nn.functional.cross_entropy
    return cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def collect_fishers(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Linear],
    examples: Sequence[Example],
    pad_id: int,
    progress: bool = False,
    batch_size: int = 8,
    grams: Grams | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher (float32) of each module's weight: the mean over `examples` of the
    squared gradient of the example's summed answer log-likelihood. One forward and one backward pass
    per batch of `batch_size` examples; per-example gradients from hooks (medmerge.train.stat_hooks).
    With `grams`, the same forwards also add these examples' Grams into it (the Gram pass then skips
    them)."""
    if not examples:
        return {}
    seq2seq = bool(model.config.is_encoder_decoder)
    device = next(model.parameters()).device
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    head_hooked = any(m is head for m in modules.values())
    fisher = FisherHooks(model, modules)
    gram = GramHooks(modules, grams) if grams is not None else None
    total = -(-len(examples) // batch_size)
    try:
        with torch.enable_grad():
            batches = token_batches(examples, batch_size, seq2seq, pad_id, device)
            for batch, masks, counts in tqdm(batches, total=total, desc="fisher", disable=not progress):
                fisher.masks = masks
                if gram is not None:
                    gram.new_batch(masks)
                    add_counts(grams, counts)
                fisher.backward(_summed_answer_nll(model, batch, head_hooked))
    finally:
        fisher.remove()
        if gram is not None:
            gram.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: total / len(examples) for name, total in fisher.sums.items()}


def input_scales(grams: Grams, floor: float = 1e-3) -> dict[str, torch.Tensor]:
    """Per-input scales D = √(diag G / tokens) of every Linear (by weight name; aliases share their
    stored Gram's), clamped at `floor` × their largest: from Grams of PUBLIC text through the BASE model,
    they are the public `SumLayout.input_scales` of a secure sum (medmerge.merge.from_sums)."""
    tokens = max(sum(grams.tokens.values()), 1)
    stored = {}
    for name, gram in grams.sums.items():
        d = (gram.diagonal().double() / tokens).clamp(min=0).sqrt()
        stored[name] = d.clamp(min=floor * float(d.max()) if float(d.max()) > 0 else 1.0)
    return {**stored, **{alias: stored[target] for alias, target in grams.aliases.items()}}


def collect_statistics(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Linear],
    picked: Sequence[Example],
    n_gram: int,
    n_fisher: int,
    pad_id: int,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[Grams, dict[str, torch.Tensor]]:
    """Grams of picked[:n_gram] and Fishers of picked[:n_fisher] in as few passes as the model allows:
    the Fisher's forwards (with gradients) also add their examples' Grams where n_fisher ≤ n_gram, and
    the inference-mode Gram pass reads only the rest, picked[n_fisher:n_gram]."""
    seq2seq = bool(model.config.is_encoder_decoder)
    grams = new_grams(seq2seq) if n_gram else Grams()
    fused = 0 < n_fisher <= n_gram
    fishers = collect_fishers(
        model, modules, picked[:n_fisher], pad_id, progress, batch_size, grams=grams if fused else None
    )
    rest = picked[n_fisher:n_gram] if fused else picked[:n_gram]
    if rest:
        was_training = model.training
        model.eval()
        try:
            _gram_forwards(model, modules, rest, pad_id, batch_size, progress, grams)
        finally:
            model.train(was_training)
    return grams, fishers


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


def check_same_split(sources: list[dict[str, Any]], recorded: list | None, expert_dir: Path) -> None:
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
    privacy: ClipSettings | None = None,
    input_scales: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Compute `kinds` statistics of the expert in `expert_dir` on its training questions; write them
    into `out_dir` (default: the expert folder) and return that folder.

    `specs` default to the SPECs of the expert's manifest. Up to `max_examples` training questions are
    used (default 256 for the Gram, 64 for the Fisher; `fisher_examples` sets the Fisher's apart). They
    are a seeded sample (the config's seed) of the split; the Fisher's are the first of the Gram's.

    `privacy` (statistics: secure+dp; LoRA experts, Gram only): each unit's share of the released vector
    is clipped (medmerge.train.private_stats) and the units read are a keyed sample at rate
    min(1, max_examples / units), never a seeded one; statistics.json gets a "privacy" record.
    `input_scales` are the secure sum's public D (SumLayout.input_scales): the clip is of the released
    coordinates x / D.
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
    check_same_split(data.sources, recorded, expert_dir)
    if privacy is not None:
        return _private_statistics(
            expert_dir,
            out,
            kinds,
            data,
            tokenizer,
            privacy,
            max_examples,
            batch_size,
            progress,
            device,
            input_scales,
        )

    n_gram = min(len(data.train), max_examples or GRAM_EXAMPLES) if "gram" in kinds else 0
    n_fisher = min(len(data.train), fisher_examples or max_examples or FISHER_EXAMPLES)
    n_fisher = n_fisher if "fisher" in kinds else 0
    order = random.Random(config.seed).sample(range(len(data.train)), max(n_gram, n_fisher))
    picked = [data.train[i] for i in order]  # Gram: the first n_gram, Fisher: the first n_fisher

    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(expert_dir).to(resolved)
    modules = statistic_linears(model, base_weight_names(expert_dir))
    grams, fishers = collect_statistics(
        model, modules, picked, n_gram, n_fisher, tokenizer.pad_token_id, batch_size, progress
    )
    gram_tensors = grams.float32()
    grams.sums.clear()
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


def expert_deltas(expert_dir: Path, modules: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """ΔW = W − W₀ of every module: the merged LoRA expert's weight minus its base's (float32)."""
    from safetensors import safe_open

    from medmerge.models import resolve_model

    if not is_adapter(expert_dir):
        raise MedmergeError(f"{expert_dir}: clipped (DP) statistics need a LoRA expert (ΔW is its adapter)")
    wanted, deltas = set(modules), {}
    for file in sorted(resolve_model(adapter_base(expert_dir)).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in wanted & set(f.keys()):
                deltas[name] = modules[name].weight.detach().float().cpu() - f.get_tensor(name).float()
    return deltas


def _private_statistics(
    expert_dir, out, kinds, data, tokenizer, privacy, max_examples, batch_size, progress, device, input_scales
):
    """The clipped Gram statistics (`compute_statistics(..., privacy=...)`)."""
    import dataclasses

    if kinds != ["gram"]:
        raise MedmergeError(f"kinds {kinds}: clipped (DP) statistics are Gram only (no DP Fisher)")
    units = len(data.train)
    rate = min(1.0, (max_examples or GRAM_EXAMPLES) / max(units, 1))
    privacy = dataclasses.replace(privacy, rate=rate)
    groups = getattr(data, "train_groups", None) or None
    picked = [data.train[i] for i in unit_sample(data.train, groups, privacy)]
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(expert_dir).to(resolved)
    modules = statistic_linears(model, base_weight_names(expert_dir))
    spectral = spectral_norms(expert_deltas(expert_dir, modules), input_scales)
    grams, scales, _ = collect_clipped_grams(
        model, modules, picked, tokenizer.pad_token_id, spectral, privacy, batch_size, progress, input_scales
    )
    info = {
        "examples": len(picked),
        "tokens": sum(grams.tokens.values()),
        "per_kind": {"gram": {"examples": len(picked), "tokens": grams.tokens}},
        "privacy": {
            "clip": privacy.clip,
            "unit": privacy.unit,
            "per_group": privacy.per_group,
            "rate": rate,
            "diagonal": privacy.diagonal,
            "clipped_share": float((scales < 1).double().mean()) if len(scales) else 0.0,
            "spectral_max": max(spectral.values(), default=0.0),
            "sample": "keyed (HMAC-SHA256 under a key from os.urandom, never written)",
            "input_scales": input_scales is not None,
        },
        "model": {
            "path": str(expert_dir.resolve()),
            "kind": "causal",
            "adapter": True,
            "base_model": adapter_base(expert_dir),
            "checksum": expert_checksum(expert_dir),
        },
        "tokens_counted": "non-padding input tokens (prompt + answer)",
    }
    write_statistics(out, grams.float32(), {}, info, aliases=grams.aliases)
    return out
