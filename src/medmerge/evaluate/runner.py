"""THE evaluation loop: models × question sets → every metric with bootstrap intervals, paired tests.

For each model and each set: teacher-forced answer loss on the reference answers (per question, so it
can be bootstrapped), then, unless `generate=False`, generated answers scored with ROUGE / BLEU / chrF /
BERTScore / length / repetition. Each stage is cached by (model checksum, SPEC, split, questions,
settings) — see `medmerge.evaluate.cache` — and the model is loaded only if some stage misses.
The returned dict is what `results.json` holds; `medmerge.evaluate.report` renders it:

    models, datasets          name, path, checksum, kind / name, spec, split (None: whole), domain, n
    results[model][set]       metrics {name: {mean, low, high, n, confidence}}, per_item {name: [...]},
                              weights {loss: answer tokens}, corpus {bleu, chrf}, timing, cached,
                              ids, answers (None with generate=False), reference_length
    comparisons               paired bootstrap a − b per set and metric of COMPARED, every pair of models
    examples[set]             the first questions with the reference and every model's answer
    settings, manifest, cache every setting and version; cache hits / misses of this run
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medmerge.config import EvaluateConfig
from medmerge.data import QAPair, load_dataset, load_split, parse_spec, split_fingerprint
from medmerge.errors import MedmergeError
from medmerge.evaluate import bertscore as bertscore_module
from medmerge.evaluate.cache import EvalCache, cache_key
from medmerge.evaluate.generate import generate_answers
from medmerge.evaluate.metrics import METRICS, corpus_bleu_chrf, text_metrics
from medmerge.evaluate.scorer import encode_loss_batches, per_question_loss
from medmerge.evaluate.stats import bootstrap_ci, paired_bootstrap
from medmerge.manifest import build_manifest, checksum, sha256_dir, sha256_file
from medmerge.models import (
    adapter_base,
    is_adapter,
    load_model,
    load_tokenizer,
    model_kind,
    resolve_model,
)

FORMAT = "medmerge-evaluation/1"
METRICS_VERSION = 1  # bump when a metric's definition changes: invalidates cached scores
COMPARED = ("loss", "rougeL", "chrf", "bertscore_f1")  # metrics of the pairwise tests


@dataclass(frozen=True)
class EvalSet:
    name: str  # short label in tables
    spec: str
    split: str | None  # None: the whole set (out-of-domain)
    domain: str  # "in-domain" | "out-of-domain"


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: str
    checksum: str
    kind: str


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
        digest = cache_key(adapter=digest, base=checksum(resolve_model(adapter_base(path))))
    return ModelRef(name=name, path=str(path), checksum=digest, kind=model_kind(path))


def data_checksum(spec: str) -> str | None:
    """SHA-256 of a SPEC's file (or of every file of its folder); None for a fetched copy (no path)."""
    path = parse_spec(spec).path
    if path is None or not path.exists():
        return None
    return sha256_file(path) if path.is_file() else sha256_dir(path)


def load_pairs(s: EvalSet, config: EvaluateConfig) -> list[QAPair]:
    """The set's questions: its seeded split (in-domain) or the whole file (out-of-domain); first n."""
    if s.split is not None:
        return load_split(s.spec, s.split, config.split_seed, config.fractions, config.max_examples)
    pairs = load_dataset(s.spec).pairs
    return pairs[: config.max_examples] if config.max_examples else pairs


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[evaluate] {text}", file=sys.stderr, flush=True)


def evaluate(
    models: list[str], config: EvaluateConfig, *, cache_dir: str | Path | None, progress: bool = True
) -> dict[str, Any]:
    """Score every model on every set; the results dict (module doc), written by `report.write_evaluation`."""
    import torch

    if config.threads:  # on a shared CPU, fewer threads than cores avoids OpenMP spin-waiting
        torch.set_num_threads(config.threads)
    sets = eval_sets(config)
    refs = [model_ref(m) for m in models]
    if len({r.name for r in refs}) != len(refs):
        raise MedmergeError(f"evaluate: model names {[r.name for r in refs]} repeat (use NAME=PATH)")
    pairs = {s.name: load_pairs(s, config) for s in sets}
    cache = EvalCache(cache_dir)
    results: dict[str, dict[str, Any]] = {}
    for ref in refs:
        loaded: dict[str, Any] = {}

        def model(ref: ModelRef = ref, loaded: dict[str, Any] = loaded) -> Any:
            if "model" not in loaded:
                _say(progress, f"loading {ref.name} ({ref.path})")
                torch.manual_seed(config.seed)
                loaded["model"] = load_model(ref.path, dtype=config.dtype)
            return loaded["model"]

        tokenizer = load_tokenizer(ref.path)
        results[ref.name] = {}
        for s in sets:
            _say(progress, f"{ref.name} on {s.name} ({len(pairs[s.name])} questions)")
            results[ref.name][s.name] = _evaluate_one(
                ref, model, tokenizer, s, pairs[s.name], config, cache, progress
            )
        loaded.clear()
    return {
        "format": FORMAT,
        "manifest": build_manifest(
            "evaluation",
            inputs={
                "models": [asdict(r) for r in refs],
                "datasets": [asdict(s) for s in sets],
            },
            config=config,
        ),
        "settings": settings(config),
        "models": [asdict(r) for r in refs],
        "datasets": [
            {
                **asdict(s),
                "n": len(pairs[s.name]),
                "fingerprint": split_fingerprint(pairs[s.name]),
                "file_sha256": data_checksum(s.spec),
            }
            for s in sets
        ],
        "results": results,
        "comparisons": comparisons(results, refs, sets, config),
        "examples": examples(results, refs, sets, pairs, config.examples),
        "cache": {"dir": str(cache_dir) if cache_dir else None, "hits": cache.hits, "misses": cache.misses},
    }


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
    }


def _generation_settings(config: EvaluateConfig) -> dict[str, Any]:
    keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "max_prompt_tokens", "system")
    return {k: getattr(config, k) for k in keys} | {"dtype": config.dtype}


def _evaluate_one(
    ref, model, tokenizer, s: EvalSet, pairs, config: EvaluateConfig, cache: EvalCache, progress: bool
):
    """One (model, set) cell: per-question values, intervals, corpus scores and timings."""
    about = {"model": ref.name, "checksum": ref.checksum, "spec": s.spec, "split": s.split}
    data_id = {
        "checksum": ref.checksum,
        "spec": s.spec,
        "split": s.split,
        "split_seed": config.split_seed,
        "fractions": list(config.fractions),
        "questions": split_fingerprint(pairs),
    }
    loss_key = cache_key(
        stage="loss",
        **data_id,
        max_prompt_tokens=config.max_prompt_tokens,
        max_answer_tokens=config.max_answer_tokens,
        system=config.system,
        dtype=config.dtype,
    )
    loss = cache.get("loss", loss_key)
    cached = {"loss": loss is not None}
    if loss is None:
        start = time.perf_counter()
        batches, order = encode_loss_batches(
            pairs,
            tokenizer,
            ref.kind,
            batch_size=config.batch_size,
            max_prompt_tokens=config.max_prompt_tokens,
            max_answer_tokens=config.max_answer_tokens,
            system=config.system,
        )
        from tqdm import tqdm

        nll, tokens = per_question_loss(
            model(), tqdm(batches, desc="loss", unit="batch", disable=not progress), order
        )
        loss = {"nll": nll, "tokens": tokens, "seconds": time.perf_counter() - start}
        cache.put("loss", loss_key, loss, **about)
    per_item: dict[str, list[float]] = {
        "loss": [n / max(t, 1) for n, t in zip(loss["nll"], loss["tokens"], strict=True)]
    }
    weights = {"loss": [float(t) for t in loss["tokens"]]}
    timing = {"loss_seconds": loss["seconds"], "loss_seconds_per_question": loss["seconds"] / len(pairs)}
    corpus: dict[str, float] = {}
    answers: list[str] | None = None
    if config.generate:
        gen_key = cache_key(stage="generate", **data_id, **_generation_settings(config))
        gen = cache.get("generate", gen_key)
        cached["generate"] = gen is not None
        if gen is None:
            g = generate_answers(
                model(),
                tokenizer,
                [p.question for p in pairs],
                ref.kind,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                do_sample=config.do_sample,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=config.seed,
                max_prompt_tokens=config.max_prompt_tokens,
                system=config.system,
                progress=progress,
            )
            gen = {"texts": g.texts, "new_tokens": g.new_tokens, "seconds": g.seconds}
            cache.put("generate", gen_key, gen, **about)
        answers = gen["texts"]
        score_key = cache_key(stage="scores", generation=gen_key, idf=config.bertscore_idf, v=METRICS_VERSION)
        scores = cache.get("scores", score_key)
        cached["scores"] = scores is not None
        if scores is None:
            references = [p.answer for p in pairs]
            scores = text_metrics(answers, references)
            bs = bertscore_module.bertscore(answers, references, idf=config.bertscore_idf)
            scores |= {f"bertscore_{k}": v for k, v in bs.items()}
            scores["corpus"] = corpus_bleu_chrf(answers, references)
            cache.put("scores", score_key, scores, **about)
        corpus = scores["corpus"]
        per_item |= {k: v for k, v in scores.items() if k != "corpus"}
        new_tokens = sum(gen["new_tokens"])
        timing |= {
            "generation_seconds": gen["seconds"],
            "generation_seconds_per_question": gen["seconds"] / len(pairs),
            "new_tokens": new_tokens,
            "new_tokens_per_second": new_tokens / max(gen["seconds"], 1e-9),
        }
    metrics = {
        name: bootstrap_ci(
            values,
            weights=weights.get(name),
            resamples=config.bootstrap_resamples,
            confidence=config.confidence,
            seed=config.seed,
        ).as_dict()
        for name, values in per_item.items()
    }
    lo = metrics["loss"]
    metrics["perplexity"] = {**lo, **{k: math.exp(lo[k]) for k in ("mean", "low", "high")}}
    metrics = {k: metrics[k] for k in METRICS if k in metrics}
    return {
        "metrics": metrics,
        "corpus": corpus,
        "timing": timing,
        "cached": cached,
        "reference_length": sum(len(p.answer.split()) for p in pairs) / len(pairs),
        "per_item": per_item,
        "weights": weights,
        "ids": [p.id for p in pairs],
        "answers": answers,
    }


def comparisons(results, refs: list[ModelRef], sets: list[EvalSet], config: EvaluateConfig) -> list[dict]:
    """Paired bootstrap of every pair of models on every set for the COMPARED metrics (a − b)."""
    out = []
    for s, (a, b) in itertools.product(sets, itertools.combinations([r.name for r in refs], 2)):
        ra, rb = results[a][s.name], results[b][s.name]
        for metric in COMPARED:
            if metric not in ra["per_item"] or metric not in rb["per_item"]:
                continue
            test = paired_bootstrap(
                ra["per_item"][metric],
                rb["per_item"][metric],
                weights_a=ra["weights"].get(metric),
                weights_b=rb["weights"].get(metric),
                resamples=config.bootstrap_resamples,
                confidence=config.confidence,
                seed=config.seed,
            )
            out.append({"dataset": s.name, "metric": metric, "a": a, "b": b, **test.as_dict()})
    return out


def examples(results, refs: list[ModelRef], sets: list[EvalSet], pairs, n: int) -> dict[str, list[dict]]:
    """The first n questions of each set with the reference and every model's answer."""
    out: dict[str, list[dict]] = {}
    for s in sets:
        rows = []
        for i, pair in enumerate(pairs[s.name][:n]):
            answers = {r.name: _nth(results[r.name][s.name]["answers"], i) for r in refs}
            rows.append(
                {"id": pair.id, "question": pair.question, "reference": pair.answer, "answers": answers}
            )
        out[s.name] = rows
    return out


def _nth(answers: list[str] | None, i: int) -> str | None:
    return answers[i] if answers is not None else None
