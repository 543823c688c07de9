"""`run_experiment`: the study in five cached steps.

    out/experts/<name>/        one expert per dataset, and `multitask` (trained on the union)
    out/search/<method>.json   every trial of the method's hyperparameter search (validation loss)
    out/merges/<method>-<space>/  the best setting of each method, as a full model and as a LoRA adapter
    out/evaluation/            the generalization matrix (medmerge.evaluate) of base, experts,
                               multi-task and the best merge of each method
    out/report.md, verdict.json  which merge generalizes best, by how much, and the gap it closes

Each heavy step (a training, an expert's statistics, a method's search, the validation losses, the
evaluation) runs in a child process (`StepContext.call`, medmerge.isolation), so the study's peak memory
is its largest step's, not their sum. Under `torchrun` every process trains (DDP) in place; only rank 0
goes on to search, merge and evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from medmerge.config import ExperimentConfig, MergeConfig, validate_config
from medmerge.data import spec_checksum
from medmerge.isolation import run_in_child
from medmerge.manifest import build_manifest, checksum, write_json_atomic
from medmerge.merge import get_method
from medmerge.models import resolve_model
from medmerge.pipeline.executor import Executor, make_executor
from medmerge.pipeline.progress import Progress
from medmerge.pipeline.records import SearchRecord, TrainedExpert, ValidationRecord
from medmerge.pipeline.scoring import Scoring, score_model
from medmerge.pipeline.search import merge_config, search_method
from medmerge.steps import STEP_FILE, cached, recorded, step_key
from medmerge.threads import use_threads

STATISTICS_STEP = "medmerge-statistics.json"  # in an expert folder: the step record of its site statistics
T = TypeVar("T")

if TYPE_CHECKING:
    from medmerge.evaluate.records import Evaluation


@dataclass(frozen=True)
class StepContext:
    """What every step of one run reads: the experiment, its folder and the identities of its inputs."""

    config: ExperimentConfig
    out: Path
    show: Progress
    base_digest: str  # checksum of the base model
    data_digests: dict[str, str | None]  # SPEC -> checksum of its file (None: not a local file)
    scoring: Scoring  # what validation losses are measured on
    executor: Executor = field(default_factory=Executor)  # after training: local, or Ray (rank 0 only)

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a child process when the experiment isolates its steps (so what the
        step held is given back when it ends: medmerge.isolation); in this process under torchrun, on
        Ray, or with `isolate_steps: false`."""
        local = type(self.executor) is Executor and int(os.environ.get("WORLD_SIZE", "1")) == 1
        if self.config.isolate_steps and local:
            return run_in_child(what, fn, *args, threads=self.config.threads, **kwargs)
        return fn(*args, **kwargs)


def run_experiment(
    config: ExperimentConfig, out: str | Path, *, ray: str | None = None, progress: bool = True
) -> Path:
    """Run (or resume) the experiment of `config` in `out`; returns the path of the report."""
    use_threads(config.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(
        config=config,
        out=out,
        show=Progress(config, enabled=progress),
        base_digest=checksum(resolve_model(config.base_model)),
        data_digests={spec: spec_checksum(spec) for spec in config.all_specs()},
        scoring=_scoring(config),
    )
    inputs = {"base_model": ctx.base_digest, "data": ctx.data_digests}
    write_json_atomic(out / "experiment.json", build_manifest("experiment", inputs=inputs, config=config))
    experts = {e.name: list(e.data) for e in config.experts}
    if config.multitask:
        experts["multitask"] = config.all_specs()
    trained = {name: _train_step(ctx, name, specs) for name, specs in experts.items()}
    if int(os.environ.get("RANK", "0")) != 0:
        return out / "report.md"

    ctx = replace(ctx, executor=make_executor(ray))
    try:
        experts_in_order = [trained[e.name] for e in config.experts]
        merges, searches = {}, {}
        for method in _methods_with_inputs(ctx, experts_in_order):
            searches[method] = _search_step(ctx, method, experts_in_order)
            merges[method] = _merge_steps(ctx, method, experts_in_order, searches[method])
        validation = _validation_step(ctx, trained, merges, searches)
        evaluation = _evaluate_step(ctx, trained, merges, validation)
    finally:
        ctx.executor.close()
    from medmerge.pipeline.verdict import write_verdict

    return write_verdict(config, out, validation, evaluation, ctx.show)


# ------------------------------------------------------------------------------------------ train


def _train_step(ctx: StepContext, name: str, specs: list[str]) -> TrainedExpert:
    from medmerge.train import train_expert

    train = ctx.config.train_config(specs)
    folder, show = ctx.out / "experts" / name, ctx.show
    data = {s: ctx.data_digests[s] for s in specs}
    key = step_key(step="train", config=train, base=ctx.base_digest, data=data)

    def run() -> dict[str, Any] | None:
        show.start(f"training expert {name} on {', '.join(specs)}")
        pending = folder.parent / f".{name}.pending-key"  # the key whose checkpoints may be resumed
        checkpoints = folder.parent / f"{name}.checkpoint"
        resume = checkpoints.exists() and pending.is_file() and pending.read_text() == key
        if checkpoints.exists() and not resume:
            shutil.rmtree(checkpoints)
        folder.parent.mkdir(parents=True, exist_ok=True)
        pending.write_text(key)
        ctx.call(
            f"expert {name}",
            train_expert,
            train,
            folder,
            resume=resume,
            overwrite=True,
            progress=show.enabled,
        )
        show.done(f"expert {name}")
        if int(os.environ.get("RANK", "0")) != 0:
            return None  # rank 0 records the step
        pending.unlink(missing_ok=True)
        return {"expert": name}

    if cached(folder, key, "train", run)[1]:
        show.skip(f"expert {name}")
    return TrainedExpert(name, folder, key)


# ----------------------------------------------------------------------------------- search, merge


def _methods_with_inputs(ctx: StepContext, experts: list[TrainedExpert]) -> list[str]:
    """The experiment's methods whose inputs exist. The site statistics that data-aware methods need are
    computed first; a method whose inputs cannot be had (LoRA factors of full models) is left out, and
    the run says why."""
    from medmerge.merge.statistics import input_shortfall

    specs = [get_method(m) for m in ctx.config.methods]
    kinds = sorted(set().union(*(s.needs_statistics for s in specs)))
    if kinds:
        for expert in experts:
            _statistics_step(ctx, expert, kinds)
    runnable = []
    for spec in specs:
        reason = input_shortfall(spec, [e.path for e in experts])
        if reason is None:
            runnable.append(spec.name)
        else:
            ctx.show.note(f"{spec.name} left out: {reason}")
    return runnable


def _statistics_step(ctx: StepContext, expert: TrainedExpert, kinds: list[str]) -> None:
    """The expert's site statistics of `kinds`, beside its adapter (cached under their step key)."""
    from medmerge.train.statistics import compute_statistics

    settings = ctx.config.statistics
    key = step_key(step="statistics", expert=expert.key, kinds=kinds, settings=settings)

    def run() -> dict[str, Any]:
        ctx.show.start(f"statistics ({', '.join(kinds)}) of expert {expert.name}")
        ctx.call(
            f"statistics of {expert.name}",
            compute_statistics,
            expert.path,
            kinds=kinds,
            overwrite=True,
            progress=ctx.show.enabled,
            **settings.arguments(),
        )
        ctx.show.done(f"statistics of {expert.name}")
        return {"kinds": kinds}

    if cached(expert.path, key, "statistics", run, record=STATISTICS_STEP)[1]:
        ctx.show.skip(f"statistics of {expert.name}")


def _scoring(config: ExperimentConfig) -> Scoring:
    return Scoring(
        base_model=config.base_model,
        specs=tuple(config.all_specs()),
        split=config.split_settings(),
        max_examples=config.search.validation_examples,
        loss=config.search.loss_settings(),
    )


def _search_step(ctx: StepContext, method: str, experts: list[TrainedExpert]) -> SearchRecord:
    """The method's hyperparameter search on validation loss (cached in search/<method>.json)."""
    config, show = ctx.config, ctx.show
    path = ctx.out / "search" / f"{method}.json"
    upstream = [e.key for e in experts]
    if get_method(method).needs_statistics:  # the merge reads the statistics made with these settings
        upstream.append(step_key(statistics=config.statistics))
    key = step_key(
        step="search", method=method, settings=config.search, experts=upstream, scoring=repr(ctx.scoring)
    )

    def run() -> dict[str, Any]:
        show.start(f"searching {method} ({config.search.trials} trials, {config.search.sampler})")
        paths = [str(e.path) for e in experts]
        result = ctx.call(
            f"search {method}",
            search_method,
            method,
            config.base_model,
            paths,
            config.search,
            ctx.scoring,
            ctx.executor,
        )
        show.done(f"search {method}: validation loss {result.best.loss:.4f}")
        return SearchRecord(key=key, method=method, best=result.best, trials=result.trials).to_json()

    record, fresh = cached(path.parent, key, "search", run, record=path.name)
    if fresh:
        show.skip(f"search {method}")
    return SearchRecord.from_json(record)


def _merge_steps(
    ctx: StepContext, method: str, experts: list[TrainedExpert], search: SearchRecord
) -> dict[str, Path]:
    """The search's best setting merged in each space of the experiment: {space: merge folder}."""
    from medmerge.merge import merge_models

    config, show = ctx.config, ctx.show
    expert_paths = [str(e.path) for e in experts]
    base = merge_config(method, config.base_model, expert_paths, search.best, config.search.seed)
    folders = {}
    for space in config.spaces:
        update: dict[str, Any] = {"dtype": config.dtype}
        if space == "lora":
            update |= {"output": "lora", "rank": config.lora_rank or _summed_rank(expert_paths)}
        merge = validate_config({**base.model_dump(by_alias=True), **update}, MergeConfig, f"merge {method}")
        folder = ctx.out / "merges" / f"{method}-{space}"
        key = step_key(step="merge", config=merge, search=search.key)

        def run(merge: MergeConfig = merge, folder: Path = folder, space: str = space) -> dict[str, Any]:
            show.start(f"merging {method} ({space})")
            merge_models(merge, folder, overwrite=True, progress=False)
            return {"method": method, "space": space}

        if cached(folder, key, "merge", run)[1]:
            show.skip(f"merge {method} ({space})")
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


def _validation_step(
    ctx: StepContext,
    trained: dict[str, TrainedExpert],
    merges: dict[str, dict[str, Path]],
    searches: dict[str, SearchRecord],
) -> dict[str, ValidationRecord]:
    """Validation loss of every candidate (experts, multi-task, base, each method × space).

    A float32 full-space merge is exactly the search's best trial, scored on the same questions: its
    loss is taken from the search instead of being computed again.
    """
    scoring = repr(ctx.scoring)
    candidates = {"base": ctx.config.base_model} | {name: str(t.path) for name, t in trained.items()}
    for method, folders in merges.items():
        candidates |= {f"{method}-{space}": str(folder) for space, folder in folders.items()}
    path = ctx.out / "validation.json"
    keys = {name: _folder_key(p) for name, p in candidates.items()}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    records = {}
    if cached.get("scoring") == scoring:
        records = {name: ValidationRecord.from_json(r) for name, r in cached["models"].items()}
    if ctx.config.dtype == "float32":
        for method, search in searches.items():
            if "full" in merges[method]:
                name, best = f"{method}-full", search.best
                records[name] = ValidationRecord(
                    keys[name], candidates[name], best.loss, best.per_dataset, source="search"
                )
    todo = [n for n in candidates if n not in records or records[n].key != keys[n]]
    if todo:
        ctx.show.start(f"validation loss of {len(todo)} models")
        calls = [(candidates[n], ctx.scoring) for n in todo]
        scores = ctx.call("validation loss", ctx.executor.map, score_model, calls)
        for name, score in zip(todo, scores, strict=True):
            loss, per_dataset = score["loss"], score["per_dataset"]
            records[name] = ValidationRecord(keys[name], candidates[name], loss, per_dataset)
        models = {name: record.to_json() for name, record in records.items()}
        write_json_atomic(path, {"scoring": scoring, "models": models})
    else:
        ctx.show.skip("validation loss")
    return {n: records[n] for n in candidates}


def _folder_key(path: str) -> str:
    """A model's identity for caching: its step key if medmerge made it, else its checksum."""
    record = recorded(Path(path) / STEP_FILE)
    return record["key"] if record is not None else checksum(resolve_model(path))


def best_space(validation: dict[str, ValidationRecord], method: str, spaces: list[str]) -> str:
    """The space (full / lora) in which `method`'s merge has the lower validation loss."""
    return min(spaces, key=lambda space: validation[f"{method}-{space}"].loss)


def _evaluate_step(
    ctx: StepContext,
    trained: dict[str, TrainedExpert],
    merges: dict[str, dict[str, Path]],
    validation: dict[str, ValidationRecord],
) -> Evaluation:
    """The generalization matrix of base, experts, multi-task and each method's best space; returns
    the `medmerge.evaluate.records.Evaluation`, also written (results.json, report) to out/evaluation."""
    from medmerge.evaluate.report import write_evaluation
    from medmerge.evaluate.runner import evaluate

    config, show = ctx.config, ctx.show
    evaluate_config = config.evaluate_config()
    models = [f"base={config.base_model}"] + [f"{name}={t.path}" for name, t in trained.items()]
    for method, folders in merges.items():
        space = best_space(validation, method, config.spaces)
        models.append(f"{method}={folders[space]}")
    show.start(
        f"evaluating {len(models)} models on {len(evaluate_config.data) + len(evaluate_config.ood)} sets"
    )
    cache_dir = ctx.out / "cache" / "evaluate"
    evaluation = ctx.call(
        "evaluation", evaluate, models, evaluate_config, cache_dir=cache_dir, progress=show.enabled
    )
    write_evaluation(evaluation, ctx.out / "evaluation", overwrite=True)
    show.done("evaluation")
    return evaluation
