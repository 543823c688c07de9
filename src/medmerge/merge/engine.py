"""The streaming merge engine: one loop over tensor names, every input read one tensor at a time.

Peak memory ≈ one float32 tensor per input (plus the method's scratch); output tensors go to disk as
soon as they are merged. The output folder is built under a temporary name and renamed into place
when complete, with `merge.json`: config, input checksums, versions and per-tensor statistics.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medmerge.config import MergeConfig, MergeInput
from medmerge.errors import MedmergeError
from medmerge.manifest import atomic_dir, build_manifest, sha256_file, write_json_atomic
from medmerge.merge import checks
from medmerge.merge.lora import factor
from medmerge.merge.registry import MethodSpec, get_method
from medmerge.merge.soup import Scorer, greedy_soup, loss_scorer
from medmerge.merge.sources import Source, open_source

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".safetensors.index.json",
    ".bin.index.json",
)
_NOT_COPIED = {"merge.json", "medmerge-model.json", "adapter_config.json", "adapter_model.safetensors"}


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


def _finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse NaN/Inf. A finite sum proves every entry finite in one read-only pass; only a non-finite
    sum (NaN/Inf present, or an overflow of the float32 sum) pays for the exact elementwise check."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    bad = int(torch.count_nonzero(~torch.isfinite(tensor)))
    if bad:
        raise MedmergeError(f"{where}: tensor {name} has {bad} NaN/Inf values")


def _check_inputs(name, thetas, base_tensor, sources, base) -> None:
    for source, theta in zip(sources, thetas, strict=True):
        _finite(name, theta, str(source.path))
    if base_tensor is not None:
        _finite(name, base_tensor, str(base.path))


def merge_tensors(
    spec: MethodSpec,
    params: object,
    base: Source | None,
    sources: list[Source],
    weights: list[float],
    names: list[str],
    progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """Yield (name, merged float32 tensor or copied non-float tensor, stats) for each name, in order."""
    use_base = base is not None and (spec.base == "required" or getattr(params, "relative", False))
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
        first = sources[0].read(name)
        if not first.is_floating_point():  # integer buffers: must agree, copied as they are
            for other in sources[1:]:
                if not torch.equal(other.read(name), first):
                    raise MedmergeError(
                        f"{other.path}: non-float tensor {name} differs from {sources[0].path}"
                    )
            yield name, first, {}
            continue
        thetas = [first.to(torch.float32)]
        thetas += [s.read(name).to(torch.float32) for s in sources[1:]]
        base_tensor = base.read(name).to(torch.float32) if use_base else None
        if not spec.task_vectors:
            _check_inputs(name, thetas, base_tensor, sources, base)
        merged = spec.merge(name, base_tensor, thetas, weights, params)
        del first, thetas, base_tensor  # only the output stays alive while the next tensors are read
        if spec.task_vectors and not all(math.isfinite(x) for x in merged.stats["tau_norm"]):
            # some τ_i is not finite: re-read the inputs to name the culprit (a float32 norm can also
            # overflow on finite inputs, in which case this finds nothing and the output check decides)
            again = [s.read(name).to(torch.float32) for s in sources]
            _check_inputs(name, again, base.read(name).to(torch.float32), sources, base)
        _finite(name, merged.tensor, f"merge output ({spec.name})")
        yield name, merged.tensor, merged.stats
        del merged


def _copy_side_files(source_dir: Path, out: Path, dtype: str) -> None:
    """Config, generation config and tokenizer files of the reference folder; config dtype set to `dtype`."""
    for file in sorted(source_dir.iterdir()):
        if not file.is_file() or file.name in _NOT_COPIED or file.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if file.name == "config.json":
            config = json.loads(file.read_text())
            config["dtype" if "dtype" in config else "torch_dtype"] = dtype
            (out / file.name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(file, out / file.name)


def cached_sha256(path: Path) -> str:
    """SHA-256 of a weight file, cached in $MEDMERGE_CACHE/checksums.json under (path, size, mtime, inode).

    Merge searches merge the same experts many times; each file is hashed once while it is unchanged.
    """
    from medmerge.models import cache_root

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache_file = cache_root() / "checksums.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        try:
            fresh = json.loads(cache_file.read_text())  # keep what other processes added meanwhile
        except (OSError, json.JSONDecodeError):
            fresh = {}
        write_json_atomic(cache_file, {**fresh, key: cache[key]})
    return cache[key]


def _checksums(sources: list[Source], base: Source | None) -> dict[str, str]:
    files = sorted({f for s in ([base] if base else []) + sources for f in s.weight_files()})
    return {str(f): cached_sha256(f) for f in files}


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

    `scorer` (model folder → score, higher is better) is used by soup_greedy; without it, soup_greedy
    builds one from `config.scorer` (validation answer loss).
    """
    spec = get_method(config.method)
    params = config.method_params()
    started = time.perf_counter()
    base, sources = open_merge_inputs(config)
    if config.output == "lora" and base is None:
        raise MedmergeError(
            "base_model: output: lora stores ΔW = θ_merged − θ_base, so base_model is required"
        )
    if spec.merge is None:
        return _greedy_soup(config, out_dir, scorer, overwrite, progress)
    reference = base if base is not None else sources[0]
    names = list(reference.infos)
    weights = [m.weight for m in config.models]
    stream = merge_tensors(spec, params, base, sources, weights, names, progress)
    with ThreadPoolExecutor(max_workers=1) as pool, atomic_dir(out_dir, overwrite) as tmp:
        digests = pool.submit(_checksums, sources, base)
        if config.output == "lora":
            stats, extra = _write_lora(config, reference, base, stream, tmp)
        else:
            stats, extra = _write_full(config, reference, stream, tmp)
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
    return Path(out_dir)


def _write_full(config: MergeConfig, reference: Source, stream, tmp: Path) -> tuple[dict, dict]:
    from medmerge.merge.tensors import ShardWriter

    dtype = DTYPES[config.dtype]
    plan = [(n, dtype if i.dtype.is_floating_point else i.dtype, i.shape) for n, i in reference.infos.items()]
    writer = ShardWriter(tmp, plan, int(config.shard_mb * 1024 * 1024))
    stats: dict[str, dict] = {}
    for name, tensor, tensor_stats in stream:
        writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        stats[name] = tensor_stats
        del tensor  # free it before the engine reads the next tensors
    writer.close()
    _copy_side_files(reference.path, tmp, config.dtype)
    return stats, {"shards": writer.names}


def _module_types(reference: Source) -> dict[str, str]:
    """{weight name: "linear" | "embedding"} of the reference architecture, from a meta-device model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    hf_config = AutoConfig.from_pretrained(reference.path)
    auto = AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    types = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            types[f"{module_name}.weight"] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            types[f"{module_name}.weight"] = "embedding"
    return types


def _write_lora(config: MergeConfig, reference: Source, base: Source, stream, tmp: Path) -> tuple[dict, dict]:
    """ΔW = θ_merged − θ_base of every Linear / Embedding weight, factored by truncated SVD to rank k."""
    from safetensors.torch import save_file

    types = _module_types(reference)
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    targets, rank_pattern, not_representable = [], {}, {}
    for name, tensor, tensor_stats in stream:
        stats[name] = tensor_stats
        if not tensor.is_floating_point():
            continue
        delta = tensor - base.read(name).to(torch.float32)
        delta_norm = float(delta.norm())
        if delta_norm == 0.0:
            continue
        kind = types.get(name)
        if kind is None or delta.dim() != 2:
            not_representable[name] = delta_norm / max(float(tensor.norm()), 1e-12)
            continue
        module = name.removesuffix(".weight")
        f = factor(delta, config.rank)
        stats[name] = {**tensor_stats, "lora_rank": f.rank, "svd_relative_error": f.relative_error}
        prefix = f"base_model.model.{module}"
        if kind == "linear":
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = f.a, f.b
        else:  # embedding: ΔW (vocab, dim) = (B_e·A_e)ᵀ with A_e (k, vocab), B_e (dim, k)
            tensors[f"{prefix}.lora_embedding_A"] = f.b.T.contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = f.a.T.contiguous()
        targets.append(module)
        if f.rank != config.rank:
            rank_pattern[module] = f.rank
    if not_representable:
        log.warning(
            "%d changed tensors are not Linear/Embedding weights and are not in the adapter: %s",
            len(not_representable),
            ", ".join(list(not_representable)[:5]),
        )
    dtype = DTYPES[config.dtype]
    save_file(
        {k: v.to(dtype) for k, v in tensors.items()},
        str(tmp / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if reference.config.get("is_encoder_decoder") else "CAUSAL_LM",
        "base_model_name_or_path": str(base.path),
        "r": config.rank,
        "lora_alpha": config.rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    _copy_side_files(reference.path, tmp, config.dtype)
    (tmp / "config.json").unlink(missing_ok=True)  # an adapter folder carries adapter_config.json only
    errors = [s["svd_relative_error"] for s in stats.values() if "svd_relative_error" in s]
    return stats, {
        "lora": {
            "rank": config.rank,
            "modules": len(targets),
            "max_svd_relative_error": max(errors, default=0.0),
            "not_representable": not_representable,
        }
    }


def _greedy_soup(
    config: MergeConfig, out_dir, scorer: Scorer | None, overwrite: bool, progress: bool
) -> Path:
    if scorer is None:
        if config.scorer is None:
            raise MedmergeError(
                "soup_greedy needs a scorer: give `scorer: {specs: [SPEC, …]}` in the config, "
                "or pass scorer= to medmerge.merge.merge_models"
            )
        scorer = loss_scorer(config.scorer)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MedmergeError(f"{out_dir}: output already exists (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.soup-", dir=out_dir.parent) as work:
        counter = iter(range(1 << 30))

        def score(members: list[MergeInput]) -> float:
            path = _resolve(members[0].path)
            if len(members) == 1 and not (path / "adapter_config.json").is_file():
                return scorer(path)
            sub = _soup_config(config, members)
            return scorer(merge_models(sub, Path(work) / f"soup-{next(counter)}", progress=False))

        result = greedy_soup(list(config.models), score)
    final = _soup_config(config, [config.models[i] for i in result.members], dtype=config.dtype)
    path = merge_models(final, out_dir, overwrite=overwrite, progress=progress)
    manifest = json.loads((path / "merge.json").read_text())
    manifest["config"] = config.model_dump(mode="json")
    manifest["soup"] = {
        "members": [config.models[i].path for i in result.members],
        "score": result.score,
        "individual": dict(zip([m.path for m in config.models], result.individual, strict=True)),
        "history": result.history,
    }
    write_json_atomic(path / "merge.json", manifest)
    return path


def _soup_config(config: MergeConfig, members: list[MergeInput], dtype: str = "float32") -> MergeConfig:
    """The uniform linear merge of `members` with the rest of `config` (base for adapters, output form)."""
    return MergeConfig(
        method="linear",
        base_model=config.base_model,
        models=[MergeInput(path=m.path, weight=1.0) for m in members],
        dtype=dtype,
        output=config.output if dtype == config.dtype else "full",
        rank=config.rank if dtype == config.dtype and config.output == "lora" else None,
        shard_mb=config.shard_mb,
    )
