"""THE evaluation loop: models × question sets → every metric with bootstrap intervals, paired tests.

For each model and each set: teacher-forced answer loss on the reference answers (per question, so it
can be bootstrapped), then, unless `generate=False`, generated answers scored with ROUGE / BLEU / chrF /
BERTScore / length / repetition. Each stage is cached by (model checksum, SPEC, split, questions,
settings) — see `medmerge.evaluate.cache` — and the model is loaded only if some stage misses.
`evaluate` returns an `Evaluation` (`medmerge.evaluate.records`: models, sets, a cell per (model, set),
paired tests of COMPARED, examples, settings, manifest, cache hits), which `results.json` holds and
`medmerge.evaluate.report` renders.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medmerge.config import EvaluateConfig
from medmerge.data import QAPair, load_dataset, load_split, parse_spec, spec_checksum, split_fingerprint
from medmerge.errors import MedmergeError
from medmerge.evaluate import bertscore as bertscore_module
from medmerge.evaluate import choices as choices_module
from medmerge.evaluate.cache import EvalCache
from medmerge.evaluate.generate import generate_answers
from medmerge.evaluate.metrics import METRICS, corpus_bleu_chrf, text_metrics
from medmerge.evaluate.privacy import dp_guarantee, refuse_training_split
from medmerge.evaluate.records import (
    CacheStats,
    Comparison,
    EvalCell,
    EvalSet,
    Evaluation,
    Example,
    ModelRef,
    ScoredSet,
    Timing,
)
from medmerge.evaluate.scorer import encode_loss_batches, per_question_loss
from medmerge.evaluate.stats import Interval, bootstrap_ci, paired_bootstrap
from medmerge.manifest import build_manifest, checksum
from medmerge.models import (
    adapter_base,
    is_adapter,
    load_model,
    load_tokenizer,
    model_kind,
    resolve_model,
)
from medmerge.steps import step_key

METRICS_VERSION = 1  # bump when a metric's definition changes: invalidates cached scores
COMPARED = ("loss", "rougeL", "chrf", "bertscore_f1", "accuracy")  # metrics of the pairwise tests


def eval_sets(config: EvaluateConfig) -> list[EvalSet]:
    """In-domain sets (`data`, their split) then out-of-domain sets (`ood`, whole), with unique names."""
    sets, seen = [], set()
    for spec, domain in [(s, "in-domain") for s in config.data] + [(s, "out-of-domain") for s in config.ood]:
        parsed = parse_spec(spec)
        base = parsed.path.stem if parsed.kind in ("jsonl", "csv") and parsed.path else parsed.kind
        name = next(n for n in [base] + [f"{base}-{k}" for k in range(2, 100)] if n not in seen)
        seen.add(name)
        sets.append(EvalSet(name, parsed.text, config.split if domain == "in-domain" else None, domain))
    if not sets:
        raise MedmergeError("evaluate: no question sets (give --data SPEC and/or --ood SPEC)")
    return sets


def model_ref(text: str) -> ModelRef:
    """`NAME=PATH`, an embedded model name, or a model / adapter folder (named after the folder)."""
    name, sep, target = text.partition("=")
    if not sep:
        name, target = "", text
    path = resolve_model(target)
    name = name or (target if not Path(target).exists() else Path(target).resolve().name)
    digest = checksum(path)
    if is_adapter(path):  # the adapter's numbers also depend on its base
        digest = step_key(adapter=digest, base=checksum(resolve_model(adapter_base(path))))
    guarantee = dp_guarantee(path)
    dp = None if guarantee is None else guarantee.label
    return ModelRef(name=name, path=str(path), checksum=digest, kind=model_kind(path), dp=dp)


def load_pairs(s: EvalSet, config: EvaluateConfig) -> list[QAPair]:
    """The set's questions: its seeded split (in-domain) or the whole file (out-of-domain); first n."""
    if s.split is not None:
        return load_split(s.spec, s.split, config.split_seed, config.fractions, config.max_examples)
    pairs = load_dataset(s.spec).pairs
    return pairs[: config.max_examples] if config.max_examples else pairs


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[evaluate] {text}", file=sys.stderr, flush=True)


@dataclass
class ModelRun:
    """What scoring one model on every set shares: the model (loaded on first use, so a full cache never
    loads it), its tokenizer, the settings and the cache."""

    ref: ModelRef
    tokenizer: Any
    config: EvaluateConfig
    cache: EvalCache
    progress: bool
    _model: Any = field(default=None, repr=False)

    def model(self) -> Any:
        if self._model is None:
            import torch

            _say(self.progress, f"loading {self.ref.name} ({self.ref.path})")
            torch.manual_seed(self.config.seed)
            self._model = load_model(self.ref.path, dtype=self.config.dtype)
        return self._model

    def release(self) -> None:
        """Drop the model, so that it is freed before the next one loads."""
        self._model = None


def evaluate(
    models: list[str], config: EvaluateConfig, *, cache_dir: str | Path | None, progress: bool = True
) -> Evaluation:
    """Score every model on every set (module doc); written by `report.write_evaluation`.

    Torch's thread count is the caller's: each command sets it once at its entry point.
    """
    sets = eval_sets(config)
    refs = [model_ref(m) for m in models]
    if len({r.name for r in refs}) != len(refs):
        raise MedmergeError(f"evaluate: model names {[r.name for r in refs]} repeat (use NAME=PATH)")
    refuse_training_split(refs, config.split if config.data else None)  # exact stats of private pairs
    pairs = {s.name: load_pairs(s, config) for s in sets}
    cache = EvalCache(cache_dir)
    cells: dict[tuple[str, str], EvalCell] = {}
    for ref in refs:
        run = ModelRun(ref, load_tokenizer(ref.path), config, cache, progress)
        for s in sets:
            _say(progress, f"{ref.name} on {s.name} ({len(pairs[s.name])} questions)")
            cells[(ref.name, s.name)] = evaluate_cell(run, s, pairs[s.name])
        run.release()
    scored = tuple(
        ScoredSet(
            **asdict(s),
            n=len(pairs[s.name]),
            fingerprint=split_fingerprint(pairs[s.name]),
            file_sha256=spec_checksum(s.spec),
        )
        for s in sets
    )
    return Evaluation(
        manifest=build_manifest(
            "evaluation",
            inputs={"models": [asdict(r) for r in refs], "datasets": [asdict(s) for s in sets]},
            config=config,
        ),
        settings=settings(config),
        models=tuple(refs),
        datasets=scored,
        cells=cells,
        comparisons=comparisons(cells, refs, sets, config),
        examples=examples(cells, refs, sets, pairs, config.examples),
        cache=CacheStats(dir=str(cache_dir) if cache_dir else None, hits=cache.hits, misses=cache.misses),
    )


def settings(config: EvaluateConfig) -> dict[str, Any]:
    """Every setting that decided the numbers, with the metric definitions written out."""
    return {
        **config.model_dump(mode="json"),
        "metrics_version": METRICS_VERSION,
        "bertscore_encoder": bertscore_module.ENCODER_NAME,
        "bertscore_note": "MiniLM-L6 BERTScore, not comparable with published roberta-large BERTScore",
        "rouge": "rouge-score F-measure, Porter stemmer",
        "bleu_chrf": "sacrebleu sentence scores (BLEU exp smoothing), 0-100; corpus scores in 'corpus'",
        "repetition": "rep-4: 1 - distinct word 4-grams / word 4-grams",
        "loss": "mean NLL per reference-answer token (nats), eos included, answers cut at max_answer_tokens",
        "intervals": f"percentile bootstrap over questions, {config.bootstrap_resamples} resamples",
        "accuracy": choices_module.PROTOCOL,
    }


def _generation_settings(config: EvaluateConfig) -> dict[str, Any]:
    keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "max_prompt_tokens", "system")
    return {k: getattr(config, k) for k in keys} | {"dtype": config.dtype}


def _loss_stage(run: ModelRun, pairs: list[QAPair], data_id: dict, about: dict) -> tuple[dict, bool]:
    """Per-question answer NLL (nats, summed over answer tokens) and token counts; (values, cache hit)."""
    config = run.config
    key = step_key(
        stage="loss",
        **data_id,
        max_prompt_tokens=config.max_prompt_tokens,
        max_answer_tokens=config.max_answer_tokens,
        system=config.system,
        dtype=config.dtype,
    )

    def compute() -> dict:
        from tqdm import tqdm

        start = time.perf_counter()
        batches, order = encode_loss_batches(
            pairs,
            run.tokenizer,
            run.ref.kind,
            batch_size=config.batch_size,
            max_prompt_tokens=config.max_prompt_tokens,
            max_answer_tokens=config.max_answer_tokens,
            system=config.system,
        )
        nll, tokens = per_question_loss(
            run.model(), tqdm(batches, desc="loss", unit="batch", disable=not run.progress), order
        )
        return {"nll": nll, "tokens": tokens, "seconds": time.perf_counter() - start}

    return run.cache.cached("loss", key, compute, **about)


def _choices_stage(run: ModelRun, pairs: list[QAPair], data_id: dict, about: dict) -> tuple[dict, bool]:
    """Per-question log-likelihoods of yes / no / maybe (`medmerge.evaluate.choices`); (values, hit)."""
    key = step_key(stage="choices", **data_id, dtype=run.config.dtype, v=choices_module.VERSION)

    def compute() -> dict:
        start = time.perf_counter()
        contexts = [choices_module.pubmedqa_context(p) for p in pairs]
        ll = choices_module.choice_loglikelihoods(
            run.model(), run.tokenizer, run.ref.kind, contexts, batch_size=run.config.batch_size
        )
        return {"loglikelihoods": ll, "seconds": time.perf_counter() - start}

    return run.cache.cached("choices", key, compute, **about)


def _generate_stage(run: ModelRun, pairs: list[QAPair], data_id: dict, about: dict) -> tuple[dict, str, bool]:
    """Generated answers, new-token counts and seconds; (values, their cache key, cache hit)."""
    key = step_key(stage="generate", **data_id, **_generation_settings(run.config))

    def compute() -> dict:
        questions = [p.question for p in pairs]
        g = generate_answers(
            run.model(), run.tokenizer, questions, run.ref.kind, run.config, progress=run.progress
        )
        return {"texts": g.texts, "new_tokens": g.new_tokens, "seconds": g.seconds}

    gen, hit = run.cache.cached("generate", key, compute, **about)
    return gen, key, hit


def _score_stage(
    run: ModelRun, answers: list[str], pairs: list[QAPair], gen_key: str, about: dict
) -> tuple[dict, bool]:
    """Per-question text metrics and BERTScore of `answers`, plus corpus BLEU / chrF; (scores, hit)."""
    key = step_key(stage="scores", generation=gen_key, idf=run.config.bertscore_idf, v=METRICS_VERSION)

    def compute() -> dict:
        references = [p.answer for p in pairs]
        scores = text_metrics(answers, references)
        bs = bertscore_module.bertscore(answers, references, idf=run.config.bertscore_idf)
        scores |= {f"bertscore_{k}": v for k, v in bs.items()}
        scores["corpus"] = corpus_bleu_chrf(answers, references)
        return scores

    return run.cache.cached("scores", key, compute, **about)


@dataclass
class _Cell:
    """A cell while its stages fill it: per-question values (and loss weights), metrics over a subset of
    the questions (no per-item entry), corpus scores, timing, answers and which stages were cache hits."""

    per_item: dict[str, list[float]]
    weights: dict[str, list[float]]
    timing: Timing
    cached: dict[str, bool]
    subsets: dict[str, list[float]] = field(default_factory=dict)
    corpus: dict[str, float] = field(default_factory=dict)
    answers: list[str] | None = None


def _data_id(run: ModelRun, s: EvalSet, pairs: list[QAPair]) -> dict[str, Any]:
    """What identifies the scored questions in every stage's cache key."""
    config = run.config
    return {
        "checksum": run.ref.checksum,
        "spec": s.spec,
        "split": s.split,
        "split_seed": config.split_seed,
        "fractions": list(config.fractions),
        "questions": split_fingerprint(pairs),
    }


def _loss_cell(run: ModelRun, pairs: list[QAPair], data_id: dict, about: dict) -> _Cell:
    """Loss per question = Σ nll / answer tokens, weighted by its tokens in the mean."""
    loss, hit = _loss_stage(run, pairs, data_id, about)
    return _Cell(
        per_item={"loss": [n / max(t, 1) for n, t in zip(loss["nll"], loss["tokens"], strict=True)]},
        weights={"loss": [float(t) for t in loss["tokens"]]},
        timing=Timing(loss["seconds"], loss["seconds"] / len(pairs)),
        cached={"loss": hit},
    )


def _add_accuracy(
    cell: _Cell, run: ModelRun, s: EvalSet, pairs: list[QAPair], data_id: dict, about: dict
) -> None:
    """PubMedQA's yes / no / maybe accuracy (lm-eval's protocol), and on the test half of PQA-L alone."""
    found, cell.cached["choices"] = _choices_stage(run, pairs, data_id, about)
    labels = [p.extra["final_decision"] for p in pairs]
    cell.per_item["accuracy"] = choices_module.accuracy_per_item(found["loglikelihoods"], labels)
    cell.subsets["accuracy_test"] = choices_module.test_half_values(
        cell.per_item["accuracy"], pairs, load_dataset(s.spec).pairs
    )


def _add_generation(cell: _Cell, run: ModelRun, pairs: list[QAPair], data_id: dict, about: dict) -> None:
    """Generated answers (the first `generate_examples` questions) and their scores, with throughput."""
    config = run.config
    asked = pairs[: config.generate_examples] if config.generate_examples else pairs
    asked_id = data_id | {"questions": split_fingerprint(asked)}
    gen, gen_key, cell.cached["generate"] = _generate_stage(run, asked, asked_id, about)
    cell.answers = gen["texts"]
    scores, cell.cached["scores"] = _score_stage(run, cell.answers, asked, gen_key, about)
    cell.corpus = scores["corpus"]
    cell.per_item |= {k: v for k, v in scores.items() if k != "corpus"}
    new_tokens = sum(gen["new_tokens"])
    cell.timing = Timing(
        cell.timing.loss_seconds,
        cell.timing.loss_seconds_per_question,
        generation_seconds=gen["seconds"],
        generation_seconds_per_question=gen["seconds"] / len(asked),
        new_tokens=new_tokens,
        new_tokens_per_second=new_tokens / max(gen["seconds"], 1e-9),
    )


def _intervals(cell: _Cell, config: EvaluateConfig) -> dict[str, Interval]:
    """Bootstrap intervals of every metric; perplexity = exp(loss) (mean and interval bounds alike)."""
    metrics = {
        name: bootstrap_ci(
            values,
            weights=cell.weights.get(name),
            resamples=config.bootstrap_resamples,
            confidence=config.confidence,
            seed=config.seed,
        )
        for name, values in (cell.per_item | cell.subsets).items()
        if values
    }
    lo = metrics["loss"]
    metrics["perplexity"] = Interval(
        math.exp(lo.mean), math.exp(lo.low), math.exp(lo.high), lo.n, lo.confidence
    )
    return metrics


def evaluate_cell(run: ModelRun, s: EvalSet, pairs: list[QAPair]) -> EvalCell:
    """One (model, set) cell: per-question values, intervals, corpus scores and timings. Its stages
    (loss; PubMedQA accuracy where the set has labels; generation and its scores) each go key → cache →
    compute → store."""
    ref, config = run.ref, run.config
    about = {"model": ref.name, "checksum": ref.checksum, "spec": s.spec, "split": s.split}
    data_id = _data_id(run, s, pairs)
    cell = _loss_cell(run, pairs, data_id, about)
    if config.pubmedqa_accuracy and choices_module.has_choices(pairs):
        _add_accuracy(cell, run, s, pairs, data_id, about)
    if config.generate:
        _add_generation(cell, run, pairs, data_id, about)
    metrics = _intervals(cell, config)
    return EvalCell(
        metrics={k: metrics[k] for k in METRICS if k in metrics},
        corpus=cell.corpus,
        timing=cell.timing,
        cached=cell.cached,
        reference_length=sum(len(p.answer.split()) for p in pairs) / len(pairs),
        per_item=cell.per_item,
        weights=cell.weights,
        ids=[p.id for p in pairs],
        answers=cell.answers,
    )


def comparisons(
    cells: dict[tuple[str, str], EvalCell], refs: list[ModelRef], sets: list[EvalSet], config: EvaluateConfig
) -> tuple[Comparison, ...]:
    """Paired bootstrap of every pair of models on every set for the COMPARED metrics (a − b)."""
    out = []
    for s, (a, b) in itertools.product(sets, itertools.combinations([r.name for r in refs], 2)):
        ca, cb = cells[(a, s.name)], cells[(b, s.name)]
        for metric in COMPARED:
            if metric not in ca.per_item or metric not in cb.per_item:
                continue
            test = paired_bootstrap(
                ca.per_item[metric],
                cb.per_item[metric],
                weights_a=ca.weights.get(metric),
                weights_b=cb.weights.get(metric),
                resamples=config.bootstrap_resamples,
                confidence=config.confidence,
                seed=config.seed,
            )
            out.append(Comparison(dataset=s.name, metric=metric, a=a, b=b, test=test))
    return tuple(out)


def examples(
    cells: dict[tuple[str, str], EvalCell],
    refs: list[ModelRef],
    sets: list[EvalSet],
    pairs: dict[str, list[QAPair]],
    n: int,
) -> dict[str, list[Example]]:
    """The first n questions of each set with the reference and every model's answer."""
    out: dict[str, list[Example]] = {}
    for s in sets:
        out[s.name] = [
            Example(
                id=pair.id,
                question=pair.question,
                reference=pair.answer,
                answers={r.name: _nth(cells[(r.name, s.name)].answers, i) for r in refs},
            )
            for i, pair in enumerate(pairs[s.name][:n])
        ]
    return out


def _nth(answers: list[str] | None, i: int) -> str | None:
    return answers[i] if answers is not None and i < len(answers) else None
