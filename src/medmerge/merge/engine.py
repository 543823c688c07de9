"""The streaming merge engine: one loop over tensor names, every input read one tensor at a time.

Peak memory ≈ one float32 tensor per input (plus the method's scratch); output tensors go to disk as
soon as they are merged (medmerge.merge.writers), or into memory for a search (`merged_state`). The
output folder is built under a temporary name and renamed into place when complete, with `merge.json`
(config, input checksums, versions and per-tensor statistics), the model card `README.md`
(medmerge.model_card) and `mergekit_config.yml`, the same merge for mergekit (medmerge.merge.mergekit).
Greedy-soup methods run their walk (medmerge.merge.soup) with the caller's scorer, then merge the soup here.
Methods that read the experts' training data (RegMean++) first run their pass over the blocks
(medmerge.merge.regmean_pp), which merges each block with this loop as it goes; their output is then
held in memory (one float32 copy of the merged model) until written.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medmerge.config import MergeConfig
from medmerge.errors import MedmergeError
from medmerge.manifest import atomic_dir, build_manifest, write_json_atomic
from medmerge.merge import checks
from medmerge.merge.checksums import input_checksums
from medmerge.merge.mergekit import MERGEKIT_FILE, to_mergekit
from medmerge.merge.methods import Extras
from medmerge.merge.registry import MethodSpec, get_method
from medmerge.merge.soup import Scorer, greedy_soup_merge
from medmerge.merge.sources import Source, open_source
from medmerge.merge.statistics import input_shortfall, open_statistics
from medmerge.merge.writers import write_full, write_lora
from medmerge.model_card import merge_card, write_model_card
from medmerge.site_stats import SiteStatistics


def _resolve(path: str) -> Path:
    from medmerge.models import resolve_model

    return resolve_model(path)


def open_merge_inputs(config: MergeConfig) -> tuple[Source | None, list[Source]]:
    """The base (or None) and the model sources of `config`, opened for tensor-by-tensor reading and
    checked against each other before any tensor is read: architecture, tensor names and shapes,
    vocabulary (medmerge.merge.checks). Without base_model, adapters go on the base named in their
    adapter_config.json."""
    paths = [_resolve(m.path) for m in config.models]
    base_name = config.base_model
    if base_name is None and any((p / "adapter_config.json").is_file() for p in paths):
        from medmerge.models import adapter_base

        base_name = adapter_base(next(p for p in paths if (p / "adapter_config.json").is_file()))
    base = open_source(_resolve(base_name), None) if base_name is not None else None
    if base is not None and base.is_adapter:
        raise MedmergeError(f"base_model: {base.path} is an adapter; expected a full model folder")
    sources = [open_source(p, base) for p in paths]
    everyone = ([base] if base is not None else []) + sources
    checks.check_architecture(everyone)
    checks.check_tensors(everyone)
    checks.check_vocabulary(everyone)
    return base, sources


def _sum_is_finite(tensor: torch.Tensor) -> bool:
    """A finite sum proves every entry finite in one read-only pass (a non-finite one: NaN/Inf present, or
    an overflow of the float32 sum)."""
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum()))


def _finite(name: str, tensor: torch.Tensor, where: str, checked: bool = False) -> None:
    """Refuse NaN/Inf. Only a non-finite sum (`_sum_is_finite`; `checked`: the caller found it so)
    pays for the exact elementwise check."""
    if not checked and _sum_is_finite(tensor):
        return
    bad = int(torch.count_nonzero(~torch.isfinite(tensor)))
    if bad:
        raise MedmergeError(f"{where}: tensor {name} has {bad} NaN/Inf values")


def _check_inputs(name, thetas, base_tensor, sources, base) -> None:
    for source, theta in zip(sources, thetas, strict=True):
        _finite(name, theta, str(source.path))
    if base_tensor is not None:
        _finite(name, base_tensor, str(base.path))


def _statistics(spec: MethodSpec, sources: list[Source]) -> list[SiteStatistics]:
    """The statistics of every input, refused (one line naming the folder) where `spec` needs some that an
    input lacks; [] for methods that need none."""
    shortfall = input_shortfall(spec, [s.path for s in sources])
    if shortfall is not None:
        raise MedmergeError(shortfall)
    if not spec.needs_statistics:
        return []
    return [open_statistics(s.path) for s in sources]


def _extras(spec: MethodSpec, name: str, shape, sources, statistics: list[SiteStatistics]) -> Extras:
    """The statistics and LoRA factors of every input for tensor `name`, read now (one tensor each)."""
    found = []
    for stats in statistics:
        tensors = {kind: _float(stats.read(kind, name)) for kind in spec.needs_statistics}
        for kind, tensor in tensors.items():
            wanted = (shape[-1], shape[-1]) if kind == "gram" else tuple(shape)
            if tensor is not None and tuple(tensor.shape) != wanted:
                raise MedmergeError(
                    f"{stats.folder}: statistic {kind}::{name} has shape {tuple(tensor.shape)}, "
                    f"expected {wanted}"
                )
        found.append(tensors)
    factors = tuple(s.factors(name) for s in sources) if spec.needs_factors else ()
    return Extras(statistics=tuple(found), factors=factors)


def _float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(torch.float32)


def merge_tensors(
    spec: MethodSpec,
    params: object,
    base: Source | None,
    sources: list[Source],
    weights: list[float],
    names: list[str],
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """Yield (name, merged float32 tensor or copied non-float tensor, stats) for each name, in order.
    Inputs that lack what the method needs (site statistics, LoRA factors, training data) are refused
    here, at once; a method that needs the experts' data runs its whole pass here too."""
    statistics = _statistics(spec, sources)
    if spec.data is not None:
        merged = _data_pass(spec, params, base, sources, weights, progress)
        return ((name, *merged.pop(name)) for name in names)
    return _stream(spec, params, base, sources, weights, names, progress, statistics)


def _data_pass(spec, params, base, sources, weights, progress) -> dict[str, tuple[torch.Tensor, dict]]:
    """The method's pass over the experts' data (`spec.data`, e.g. RegMean++'s, medmerge.merge.regmean_pp):
    every tensor merged by this engine's loop and the method's tensor function, each with the statistics
    the pass took for it."""
    data = spec.data
    assert data is not None
    reads_statistics = replace(spec, needs_statistics=data.statistics, data=None)

    def merge(names: list[str], statistics: list) -> Iterator[tuple[str, torch.Tensor, dict]]:
        return _stream(reads_statistics, params, base, sources, weights, names, False, statistics)

    reference = base if base is not None else sources[0]
    return data.run(reference.path, sources, params, merge, progress)


def _stream(spec, params, base, sources, weights, names, progress, statistics) -> Iterator:
    use_base = base is not None and spec.uses_base(params)
    for name in tqdm(names, desc=f"merge {spec.name}", unit="tensor", disable=not progress):
        if base is not None and not any(s.touches(name) for s in sources):
            # Every input is an adapter that leaves `name` as its base: every method returns θ_base
            # (merging identical inputs is the identity), so skip the arithmetic.
            tensor = base.read(name)
            yield (
                name,
                tensor.to(torch.float32) if tensor.is_floating_point() else tensor,
                {"untouched": True},
            )
            continue
        copy = spec.overwrites_inputs  # private copies for a method that writes into its inputs
        first = sources[0].read(name, copy)
        if not first.is_floating_point():  # integer buffers: must agree, copied as they are
            for other in sources[1:]:
                if not torch.equal(other.read(name), first):
                    raise MedmergeError(
                        f"{other.path}: non-float tensor {name} differs from {sources[0].path}"
                    )
            yield name, first, {}
            continue
        thetas = [first.to(torch.float32)]
        thetas += [s.read(name, copy).to(torch.float32) for s in sources[1:]]
        base_tensor = base.read(name).to(torch.float32) if use_base else None
        if not spec.task_vectors and not spec.output_shows_inputs:
            _check_inputs(name, thetas, base_tensor, sources, base)
        if spec.needs_extras:
            extras = _extras(spec, name, thetas[0].shape, sources, statistics)
            merged = spec.merge(name, base_tensor, thetas, weights, params, extras)
            del extras
        else:
            merged = spec.merge(name, base_tensor, thetas, weights, params)
        del first, thetas, base_tensor  # only the output stays alive while the next tensors are read
        output_finite = _sum_is_finite(merged.tensor)
        if (spec.task_vectors and not all(math.isfinite(x) for x in merged.stats["tau_norm"])) or (
            spec.output_shows_inputs and not output_finite
        ):
            # an input may hold NaN/Inf: re-read them to name the culprit (a float32 norm or sum can also
            # overflow on finite inputs, in which case this finds nothing and the output check decides)
            again = [s.read(name).to(torch.float32) for s in sources]
            _check_inputs(name, again, base.read(name).to(torch.float32) if use_base else None, sources, base)
        if not output_finite:
            _finite(name, merged.tensor, f"merge output ({spec.name})", checked=True)
        yield name, merged.tensor, merged.stats
        del merged


def merged_state(config: MergeConfig) -> dict[str, torch.Tensor]:
    """The merged float32 tensors of `config` (a per-tensor method), by name, in memory."""
    base, sources = open_merge_inputs(config)
    names = list((base or sources[0]).infos)
    weights = [m.weight for m in config.models]
    stream = merge_tensors(
        get_method(config.method), config.method_params(), base, sources, weights, names, progress=False
    )
    return {name: tensor for name, tensor, _ in stream}


def reference_folder(config: MergeConfig) -> Path:
    """The folder whose architecture, config and tokenizer a merge of `config` has: the base model
    (for adapters without base_model, the base named in their adapter_config.json), else models[0]."""
    base, sources = open_merge_inputs(config)
    return (base or sources[0]).path


def _summary(stats: dict[str, dict]) -> dict[str, object]:
    out: dict[str, object] = {"tensors": len(stats)}
    kept = [k for s in stats.values() for k in s.get("kept", [])]
    if kept:
        out["mean_kept"] = sum(kept) / len(kept)
    conflicts = [s["sign_conflicts"] for s in stats.values() if "sign_conflicts" in s]
    if conflicts:
        out["mean_sign_conflicts"] = sum(conflicts) / len(conflicts)
    return out


def merge_models(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    scorer: Scorer | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Merge the models of `config` into `out_dir` (a model folder, or a LoRA adapter with output: lora).

    `scorer` (a candidate merge config → score, higher is better) drives methods that need one
    (soup_greedy); medmerge.evaluate.scorer.merge_loss_scorer builds the validation-loss scorer.
    """
    spec = get_method(config.method)
    params = config.method_params()
    started = time.perf_counter()
    base, sources = open_merge_inputs(config)
    if config.output == "lora" and base is None:
        raise MedmergeError(
            "base_model: output: lora stores ΔW = θ_merged − θ_base, so base_model is required"
        )
    if spec.needs_scorer:
        return _merge_soup(config, out_dir, scorer, overwrite, progress)
    reference = base if base is not None else sources[0]
    names = list(reference.infos)
    weights = [m.weight for m in config.models]
    stream = merge_tensors(spec, params, base, sources, weights, names, progress)
    with ThreadPoolExecutor(max_workers=1) as pool, atomic_dir(out_dir, overwrite) as tmp:
        digests = pool.submit(input_checksums, sources, base)
        if config.output == "lora":
            stats, extra = write_lora(config, reference, base, stream, tmp)
        else:
            stats, extra = write_full(config, reference, stream, tmp)
        manifest = build_manifest(
            "merge",
            inputs={
                "base_model": str(base.path) if base else None,
                "models": [{"path": str(s.path), "adapter": s.is_adapter} for s in sources],
                "sha256": digests.result(),
            },
            config=config,
            summary=_summary(stats),
            seconds=round(time.perf_counter() - started, 3),
            tensors=stats,
            **extra,
        )
        write_json_atomic(tmp / "merge.json", manifest)
        paths, adapters = [s.path for s in sources], [s.is_adapter for s in sources]
        (tmp / MERGEKIT_FILE).write_text(to_mergekit(config, base.path if base else None, paths, adapters))
        _write_card(tmp, manifest, reference, base, sources)
    return Path(out_dir)


def _write_card(folder: Path, manifest: dict, reference: Source, base: Source | None, sources) -> None:
    """The merge's model card (README.md), from its manifest and inputs (medmerge.model_card)."""
    kind = "seq2seq" if reference.config.get("is_encoder_decoder") else "causal"
    inputs = [s.path for s in ([base] if base is not None else []) + sources]
    write_model_card(folder, merge_card(manifest, inputs, manifest["config"]["output"] == "lora", kind))


def _merge_soup(
    config: MergeConfig, out_dir: str | Path, scorer: Scorer | None, overwrite: bool, progress: bool
) -> Path:
    """The greedy soup of `config.models`, merged into `out_dir`; merge.json records the walk."""
    if scorer is None:
        raise MedmergeError(
            f"{config.method} needs a scorer: give `scorer: {{specs: [SPEC, …]}}` in the config of "
            "`medmerge merge`, or pass scorer= to medmerge.merge.merge_models"
        )
    if Path(out_dir).exists() and not overwrite:
        raise MedmergeError(f"{out_dir}: output already exists (pass --overwrite to replace it)")
    soup = greedy_soup_merge(config, scorer)
    path = merge_models(soup.config, out_dir, overwrite=overwrite, progress=progress)
    manifest = json.loads((path / "merge.json").read_text())
    manifest["config"] = config.model_dump(mode="json")
    paths = [m.path for m in config.models]
    manifest["soup"] = {
        "members": [paths[i] for i in soup.walk.members],
        "score": soup.walk.score,
        "individual": dict(zip(paths, soup.walk.individual, strict=True)),
        "history": soup.walk.history,
    }
    write_json_atomic(path / "merge.json", manifest)
    base, sources = open_merge_inputs(soup.config)
    _write_card(path, manifest, base if base is not None else sources[0], base, sources)
    return path
