"""RegMean++ (Nguyen et al., 2025): RegMean with each block's Grams taken on the MERGED model's inputs.

RegMean (medmerge.merge.data_aware) merges every Linear by W* = (Σ w_i G̃_i)⁻¹ Σ w_i G̃_i W_i with
G_i = X_iᵀX_i, X_i the Linear's inputs in candidate i's OWN model. In the merged model, block l reads
what the merged blocks < l make; RegMean++ takes that into account. For a decoder stack of blocks
0..L−1, on the training questions Q_i of each expert i:

    h_i⁰ = merged embeddings of Q_i  (the embeddings, and everything outside the blocks but the head,
                                       merged first: Σ w_i θ_i / Σ w_i, RegMean's fallback)
    for l = 0..L−1:
        G_i^(l,m) = Σ_t x_t x_tᵀ over the non-padding inputs x_t of Linear m when candidate i's block l
                    runs on h_i^l                        (float64 sums, as medmerge.train.statistics)
        block l merged: its Linears by RegMean with the G_i^(l,m) (same α, same ridge), the rest
                    (norms, biases) Σ w_i θ_i / Σ w_i
        h_i^(l+1) = merged block l (h_i^l)
    lm_head (an untied head): RegMean with the Grams of merged final norm (h_i^L)

Block 0 thus sees the same inputs as RegMean wherever the experts' embeddings agree (LoRA experts);
later blocks differ. Candidate i's block is read from its merge source (an adapter: base + s·B·A), so
the weights the pass runs are exactly those the engine merges. The merge of each tensor is done by the
engine's per-tensor stream (`BlockMerge`), with these Grams in place of site statistics; this module
runs the models. It needs the experts' TRAINING DATA at merge time: the examples are rebuilt from each
expert's manifest (the first `examples` of the seeded sample that `medmerge stats` takes).
Decoder-only models whose blocks are `model.layers` (Llama, Mistral, Qwen2, …) only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from medmerge.errors import MedmergeError
from medmerge.merge.statistics import ExpertData

METHOD = "regmean_plus_plus"
SUPPORTED = "decoder-only models whose blocks are model.layers (Llama, Mistral, Qwen2, …)"


class Weights(Protocol):
    """A merge input read one tensor at a time (medmerge.merge.sources.Source)."""

    path: Path
    infos: dict[str, Any]  # tensor name → where it is

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class PassGrams:
    """One input's Grams of one block, read like site statistics (`SiteStatistics.read`) by the engine."""

    folder: Path
    sums: dict[str, torch.Tensor]  # float64, by weight name
    aliases: dict[str, str]  # weight name → the name whose input (and Gram) it shares

    def read(self, kind: str, name: str) -> torch.Tensor | None:
        return self.sums.get(self.aliases.get(name, name)) if kind == "gram" else None


BlockMerge = Callable[[list[str], list[PassGrams]], Iterable[tuple[str, torch.Tensor, dict]]]
# (tensor names, one PassGrams per input, or [] for none) → (name, merged float32 tensor, stats), in order


@dataclass(frozen=True)
class Batch:
    """Padded questions inside the decoder stack: hidden states h (B, T, d), the non-padding mask (B, T),
    and the keyword arguments the stack passes every block (attention mask, rotary embeddings, …)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    kwargs: dict[str, Any]


class _Stop(Exception):
    """Raised by a forward pre-hook to end a forward pass once the module's inputs are seen."""


def _stop(*_: Any) -> None:
    raise _Stop


def data_shortfall(folder: Path) -> str | None:
    """One line saying why RegMean++ cannot read the training data of the expert in `folder`, or None."""
    from medmerge.models import model_kind

    if not (folder / "manifest.json").is_file():
        return (
            f"{folder}: {METHOD} runs the expert's training questions through the models and needs its "
            "medmerge manifest (manifest.json, written by medmerge train), which this folder lacks"
        )
    if model_kind(folder) == "seq2seq":
        return f"{folder}: {METHOD} supports {SUPPORTED}; this is an encoder-decoder model"
    return None


def expert_examples(folder: Path, n: int) -> tuple[list[dict[str, list[int]]], int]:
    """The first n training examples of the seeded sample `medmerge stats --max-examples n` takes (the
    split rebuilt from the expert's manifest and checked against its fingerprints), and its pad id."""
    from medmerge.models import load_tokenizer, model_kind
    from medmerge.train.examples import prepare_data
    from medmerge.train.statistics import check_same_split, expert_train_config

    config, recorded = expert_train_config(folder, None)
    tokenizer = load_tokenizer(folder)
    train = prepare_data(config, tokenizer, model_kind(folder))
    check_same_split(train.sources, recorded, folder)
    picked = random.Random(config.seed).sample(range(len(train.train)), min(n, len(train.train)))
    return [train.train[i] for i in picked], tokenizer.pad_token_id


def decoder_stack(model: torch.nn.Module, where: Path) -> tuple[str, torch.nn.ModuleList, torch.nn.Module]:
    """(qualified name of the block list, the blocks, the final norm) of a Llama-shaped causal LM."""
    inner = getattr(model, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    if model.config.is_encoder_decoder or not isinstance(layers, torch.nn.ModuleList) or norm is None:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise MedmergeError(f"{where}: {METHOD} supports {SUPPORTED}; this is a {kind} model")
    return next(name for name, module in model.named_modules() if module is layers), layers, norm


def first_inputs(
    model: torch.nn.Module,
    first: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    pad_id: int,
    batch_size: int,
) -> list[Batch]:
    """The batches of `examples` as the decoder stack hands them to its `first` block: h⁰ = the model's
    (merged) embeddings, after whatever the stack does before its blocks, and the blocks' kwargs.
    Questions are batched by length, as medmerge.train.statistics.collect_grams does."""
    from medmerge.data import pad_batch

    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = kwargs
        raise _Stop

    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    batches = []
    try:
        for start in range(0, len(ordered), batch_size):
            padded = pad_batch(list(ordered[start : start + batch_size]), pad_id)
            mask = padded["attention_mask"].to(device)
            seen.clear()
            try:
                model(input_ids=padded["input_ids"].to(device), attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            if "hidden" not in seen:
                raise MedmergeError(f"{METHOD}: the model's forward never reached its first block")
            batches.append(Batch(seen["hidden"], mask.bool(), seen["kwargs"]))
    finally:
        handle.remove()
    return batches


def input_grams(
    module: torch.nn.Module, linears: dict[str, torch.nn.Linear], batches: Sequence[Batch], stop: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({weight name: G = Σ x xᵀ over the non-padding inputs of that Linear, float64 on the CPU}, aliases)
    while `module` runs on every batch; `stop`: end each pass once `module` has read its input (a head
    whose logits are not needed)."""
    from medmerge.train.stat_hooks import GramHooks, Grams

    grams = Grams()
    hooks = GramHooks(linears, grams)
    handle = module.register_forward_pre_hook(_stop) if stop else None
    try:
        for batch in batches:
            hooks.masks = {tuple(batch.mask.shape): batch.mask}
            try:
                module(batch.hidden, **batch.kwargs)
            except _Stop:
                pass
            hooks.seen.clear()
    finally:
        hooks.remove()
        if handle is not None:
            handle.remove()
    return {name: g.cpu() for name, g in grams.sums.items()}, grams.aliases


def _run(block: torch.nn.Module, batches: Sequence[Batch]) -> list[Batch]:
    """h ← block(h) for every batch (a decoder layer returns h, or a tuple starting with it)."""
    out = []
    for batch in batches:
        hidden = block(batch.hidden, **batch.kwargs)
        out.append(replace(batch, hidden=hidden[0] if isinstance(hidden, tuple) else hidden))
    return out


def _load(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (names under `prefix`) into `module`'s parameters; a name it lacks is an error."""
    state = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
    unexpected = module.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise MedmergeError(f"{METHOD}: tensor {prefix}{unexpected[0]} is not a weight of the model")


def _linears(module: torch.nn.Module, prefix: str, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """{weight name: nn.Linear} of `module`'s Linears whose weight is one of `names`."""
    linears = {
        f"{prefix}{sub}.weight": m for sub, m in module.named_modules() if isinstance(m, torch.nn.Linear)
    }
    return {name: m for name, m in linears.items() if name in names}


def _merge(merge: BlockMerge, names: list[str], grams: list[PassGrams]) -> dict[str, tuple]:
    return {name: (tensor, stats) for name, tensor, stats in merge(names, grams)}


@torch.no_grad()
def layer_pass(
    model: torch.nn.Module,
    sources: Sequence[Weights],
    data: Sequence[tuple[Sequence[dict[str, list[int]]], int]],
    merge: BlockMerge,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, tuple[torch.Tensor, dict]]:
    """RegMean++ of `sources` (see module doc): {tensor name: (merged tensor, stats)} for every tensor of
    sources[0]. `model` (eval mode; its weights are overwritten) runs the pass; `data` holds each input's
    (examples, pad id); `merge` merges a list of names with one PassGrams per input (or none)."""
    where = sources[0].path
    prefix, layers, norm = decoder_stack(model, where)
    head = model.get_output_embeddings()
    names = list(sources[0].infos)
    blocks = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]
    head_name = next((n for n, m in _linears(model, "", names).items() if m is head), None)
    inside = {n for block in blocks for n in block} | {head_name}
    merged = _merge(merge, [n for n in names if n not in inside], [])  # embeddings, final norm
    _load(model, "", {n: t for n, (t, _) in merged.items()})
    batches = [first_inputs(model, layers[0], examples, pad_id, batch_size) for examples, pad_id in data]
    for i, block_names in enumerate(tqdm(blocks, desc=f"{METHOD} blocks", disable=not progress)):
        block, at = layers[i], f"{prefix}.{i}."
        linears, grams = _linears(block, at, block_names), []
        for source, own in zip(sources, batches, strict=True):
            _load(block, at, {n: source.read(n) for n in block_names})  # candidate i's block l
            grams.append(PassGrams(source.path, *input_grams(block, linears, own)))
        done = _merge(merge, block_names, grams)
        _load(block, at, {n: t for n, (t, _) in done.items()})
        merged |= done
        batches = [_run(block, own) for own in batches]
    if head_name is not None:
        batches = [[replace(b, hidden=norm(b.hidden)) for b in own] for own in batches]
        grams = [
            PassGrams(s.path, *input_grams(head, {head_name: head}, own, stop=True))
            for s, own in zip(sources, batches, strict=True)
        ]
        merged |= _merge(merge, [head_name], grams)
    return merged


def regmean_plus_plus(
    reference: Path,
    sources: Sequence[Weights],
    examples: int,
    batch_size: int,
    merge: BlockMerge,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, tuple[torch.Tensor, dict]]:
    """The layer pass of `sources` on the architecture of `reference` (the base model, or the first
    full model), up to `examples` training questions per expert; on CUDA where there is one."""
    from medmerge.models import load_model

    for source in sources:
        reason = data_shortfall(source.path)
        if reason is not None:
            raise MedmergeError(reason)
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(reference).to(resolved).eval()
    decoder_stack(model, reference)  # refused before any data is read
    data = [expert_examples(source.path, examples) for source in sources]
    return layer_pass(model, sources, data, merge, batch_size, progress)


def _data_pass(reference: Path, sources: Sequence[Weights], params: Any, merge: BlockMerge, progress: bool):
    """The registry's data pass: `regmean_plus_plus` with the method's `examples` and `batch_size`."""
    return regmean_plus_plus(reference, sources, params.examples, params.batch_size, merge, progress)


DATA = ExpertData(run=_data_pass, shortfall=data_shortfall, statistics=frozenset({"gram"}))
