"""`run_experiment`: the study in five cached steps.

    out/experts/<name>/        one expert per dataset, and `multitask` (trained on the union)
    out/search/<method>.json   every trial of the method's hyperparameter search (validation loss)
    out/merges/<method>-<space>/  the best setting of each method, as a full model and as a LoRA adapter
    out/evaluation/            the generalization matrix (medmerge.evaluate) of base, experts,
                               multi-task and the best merge of each method
    out/report.md, verdict.json  which merge generalizes best, by how much, and the gap it closes

Under `torchrun` every process trains (DDP); only rank 0 goes on to search, merge and evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from medmerge.config import (
    DataConfig,
    EvaluateConfig,
    ExperimentConfig,
    MergeConfig,
    TrainConfig,
    validate_config,
)
from medmerge.data.specs import parse_spec
from medmerge.manifest import build_manifest, checksum, sha256_dir, sha256_file, write_json_atomic
from medmerge.models import resolve_model
from medmerge.pipeline.executor import Executor, make_executor
from medmerge.pipeline.progress import Progress
from medmerge.pipeline.scoring import Scoring, score_model
from medmerge.pipeline.search import merge_config, search_method
from medmerge.pipeline.steps import is_fresh, mark_done, step_key


def _data_digest(spec: str) -> str | None:
    """SHA-256 of a SPEC's file (or folder), so a changed data file invalidates what it fed."""
    path = parse_spec(spec).path
    if path is None or not path.exists():
        return None
    return sha256_dir(path) if path.is_dir() else sha256_file(path)


def _all_specs(config: ExperimentConfig) -> list[str]:
    return list(dict.fromkeys(spec for e in config.experts for spec in e.data))


def run_experiment(
    config: ExperimentConfig, out: str | Path, *, ray: str | None = None, progress: bool = True
) -> Path:
    """Run (or resume) the experiment of `config` in `out`; returns the path of the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    show = Progress(config, enabled=progress)
    if config.threads:  # on a shared CPU, fewer threads than cores avoids OpenMP spin-waiting
        import torch

        torch.set_num_threads(config.threads)
    base_digest = checksum(resolve_model(config.base_model))
    data_digests = {spec: _data_digest(spec) for spec in _all_specs(config)}
    write_json_atomic(
        out / "experiment.json",
        build_manifest("experiment", inputs={"base_model": base_digest, "data": data_digests}, config=config),
    )
    experts = {e.name: list(e.data) for e in config.experts}
    if config.multitask:
        experts["multitask"] = _all_specs(config)
    trained = {
        name: _train_step(config, name, specs, out, base_digest, data_digests, show)
        for name, specs in experts.items()
    }
    if int(os.environ.get("RANK", "0")) != 0:
        return out / "report.md"

    executor = make_executor(ray)
    try:
        scoring = _scoring(config)
        expert_paths = [str(trained[e.name][0]) for e in config.experts]
        upstream = [trained[e.name][1] for e in config.experts]
        merges, searches = {}, {}
        for method in config.methods:
            searches[method] = _search_step(
                config, method, expert_paths, upstream, scoring, executor, out, show
            )
            merges[method] = _merge_steps(config, method, expert_paths, searches[method], out, show)
        validation = _validation_step(config, trained, merges, searches, scoring, executor, out, show)
        evaluation = _evaluate_step(config, trained, merges, validation, out, show)
    finally:
        executor.close()
    from medmerge.pipeline.verdict import write_verdict

    return write_verdict(config, out, validation, evaluation, show)


# ------------------------------------------------------------------------------------------ train


def _train_step(config, name, specs, out, base_digest, data_digests, show) -> tuple[Path, str]:
    from medmerge.train import train_expert

    train = validate_config(
        {
            "threads": config.threads,
            **config.train,
            "model": config.base_model,
            "data": DataConfig(
                specs=specs,
                split_seed=config.split_seed,
                fractions=config.fractions,
                max_examples=config.train_examples,
            ),
        },
        TrainConfig,
        "train",
    )
    folder = out / "experts" / name
    key = step_key(step="train", config=train, base=base_digest, data={s: data_digests[s] for s in specs})
    if is_fresh(folder, key):
        show.skip(f"expert {name}")
        return folder, key
    show.start(f"training expert {name} on {', '.join(specs)}")
    pending = folder.parent / f".{name}.pending-key"
    checkpoints = folder.parent / f"{name}.checkpoint"
    resume = checkpoints.exists() and pending.is_file() and pending.read_text() == key
    if checkpoints.exists() and not resume:
        shutil.rmtree(checkpoints)
    folder.parent.mkdir(parents=True, exist_ok=True)
    pending.write_text(key)
    train_expert(train, folder, resume=resume, overwrite=True, progress=show.enabled)
    if int(os.environ.get("RANK", "0")) == 0:
        mark_done(folder, key, step="train", expert=name)
        pending.unlink(missing_ok=True)
    show.done(f"expert {name}")
    return folder, key


# ----------------------------------------------------------------------------------- search, merge


def _scoring(config: ExperimentConfig) -> Scoring:
    s = config.search
    return Scoring(
        base_model=config.base_model,
        specs=tuple(_all_specs(config)),
        split_seed=config.split_seed,
        fractions=config.fractions,
        max_examples=s.validation_examples,
        batch_size=s.batch_size,
        max_prompt_tokens=s.max_prompt_tokens,
        max_answer_tokens=s.max_answer_tokens,
        threads=config.threads,
    )


def _search_step(config, method, expert_paths, upstream, scoring, executor: Executor, out, show) -> dict:
    path = out / "search" / f"{method}.json"
    key = step_key(
        step="search", method=method, settings=config.search, experts=upstream, scoring=repr(scoring)
    )
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        show.skip(f"search {method}")
        return json.loads(path.read_text())
    show.start(f"searching {method} ({config.search.trials} trials, {config.search.sampler})")
    result = search_method(method, config.base_model, expert_paths, config.search, scoring, executor)
    record = {"key": key, "method": method, "best": result.best, "trials": result.trials}
    write_json_atomic(path, record)
    show.done(f"search {method}: validation loss {result.best['loss']:.4f}")
    return record


def _merge_steps(config, method, expert_paths, search: dict, out, show) -> dict[str, Path]:
    from medmerge.merge import merge_models

    best = search["best"]
    base = merge_config(
        method if method != "soup_greedy" else "linear",
        config.base_model,
        expert_paths,
        best,
        config.search.seed,
    )
    if method == "soup_greedy":  # the soup's members, uniformly averaged
        members = [m for m in base.models if m.weight > 0]
        base = base.model_copy(update={"models": members})
    folders = {}
    for space in config.spaces:
        update: dict[str, Any] = {"dtype": config.dtype}
        if space == "lora":
            update |= {"output": "lora", "rank": config.lora_rank or _summed_rank(expert_paths)}
        merge = validate_config({**base.model_dump(by_alias=True), **update}, MergeConfig, f"merge {method}")
        folder = out / "merges" / f"{method}-{space}"
        key = step_key(step="merge", config=merge, search=search["key"])
        if is_fresh(folder, key):
            show.skip(f"merge {method} ({space})")
        else:
            show.start(f"merging {method} ({space})")
            merge_models(merge, folder, overwrite=True, progress=False)
            mark_done(folder, key, step="merge", method=method, space=space)
        folders[space] = folder
    return folders


def _summed_rank(expert_paths: list[str]) -> int:
    """Σ r_i of the experts' adapters: the rank at which a LoRA-space linear merge is exact."""
    ranks = []
    for path in expert_paths:
        adapter = Path(path) / "adapter_config.json"
        ranks.append(json.loads(adapter.read_text())["r"] if adapter.is_file() else 16)
    return sum(ranks)


# -------------------------------------------------------------------------------- validation, test


def _validation_step(config, trained, merges, searches, scoring, executor: Executor, out, show) -> dict:
    """Validation loss of every candidate (experts, multi-task, base, each method × space).

    A float32 full-space merge is exactly the search's best trial, scored on the same questions: its
    loss is taken from the search instead of being computed again.
    """
    candidates = {"base": config.base_model} | {name: str(path) for name, (path, _) in trained.items()}
    for method, folders in merges.items():
        candidates |= {f"{method}-{space}": str(folder) for space, folder in folders.items()}
    path = out / "validation.json"
    keys = {name: _folder_key(p) for name, p in candidates.items()}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("scoring") != repr(scoring):
        cached = {"scoring": repr(scoring), "models": {}}
    if config.dtype == "float32":
        for method, search in searches.items():
            if "full" in merges[method]:
                name = f"{method}-full"
                best = {k: search["best"][k] for k in ("loss", "per_dataset")}
                cached["models"][name] = {
                    "key": keys[name],
                    "path": candidates[name],
                    "from": "search",
                    **best,
                }
    todo = [n for n in candidates if cached["models"].get(n, {}).get("key") != keys[n]]
    if todo:
        show.start(f"validation loss of {len(todo)} models")
        scores = executor.map(score_model, [(candidates[n], scoring) for n in todo])
        for name, score in zip(todo, scores, strict=True):
            cached["models"][name] = {"key": keys[name], "path": candidates[name], **score}
        write_json_atomic(path, cached)
    else:
        show.skip("validation loss")
    return {n: cached["models"][n] for n in candidates}


def _folder_key(path: str) -> str:
    """A model's identity for caching: its step key if medmerge made it, else its checksum."""
    record = Path(path) / "medmerge-step.json"
    if record.is_file():
        return json.loads(record.read_text())["key"]
    return checksum(resolve_model(path))


def best_space(validation: dict[str, dict], method: str, spaces: list[str]) -> str:
    """The space (full / lora) in which `method`'s merge has the lower validation loss."""
    return min(spaces, key=lambda space: validation[f"{method}-{space}"]["loss"])


def _evaluate_step(config, trained, merges, validation, out, show) -> dict[str, Any]:
    from medmerge.evaluate.report import write_evaluation
    from medmerge.evaluate.runner import evaluate

    evaluate_config = validate_config(
        {
            "split_seed": config.split_seed,
            "fractions": config.fractions,
            "threads": config.threads,
            **config.evaluate,
            "data": _all_specs(config),
        },
        EvaluateConfig,
        "evaluate",
    )
    models = [f"base={config.base_model}"] + [f"{name}={path}" for name, (path, _) in trained.items()]
    for method, folders in merges.items():
        space = best_space(validation, method, config.spaces)
        models.append(f"{method}={folders[space]}")
    show.start(
        f"evaluating {len(models)} models on {len(evaluate_config.data) + len(evaluate_config.ood)} sets"
    )
    results = evaluate(models, evaluate_config, cache_dir=out / "cache" / "evaluate", progress=show.enabled)
    write_evaluation(results, out / "evaluation", overwrite=True)
    show.done("evaluation")
    return results
