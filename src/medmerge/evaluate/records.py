"""The typed records of an evaluation, and their JSON form (`results.json`, whose shape they keep).

    EvalSet      a question set to score: name, SPEC, split (None: the whole set), domain
    ScoredSet    an EvalSet as scored: n questions, their fingerprint, the file's SHA-256
    ModelRef     a model: name, path, checksum, kind
    Timing       seconds spent on one cell (loss; generation and its tokens when generated)
    EvalCell     one model on one set: metrics with bootstrap intervals, per-question values, weights,
                 corpus scores, timing, cache hits, question ids, answers, reference length
    Comparison   a paired bootstrap test a − b of one metric on one set
    Example      one question with its reference and every model's answer
    CacheStats   cache folder, hits and misses of one run
    Evaluation   the whole evaluation: models, sets, cells by (model, set), comparisons, examples,
                 settings, manifest, cache stats

Losses are mean NLL per answer token (nats); text metrics are per-question scores (see `metrics.METRICS`);
`accuracy` (sets with PubMedQA labels, `evaluate.choices`) is 0/1 per question, and `accuracy_test` — in
`metrics` only, with no per-question list — its mean over the official 500-question test half.
`Evaluation.from_json` reads back every `results.json` of format `medmerge-evaluation/1`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.evaluate.stats import Interval, PairedTest

FORMAT = "medmerge-evaluation/1"


@dataclass(frozen=True)
class EvalSet:
    name: str  # short label in tables
    spec: str
    split: str | None  # None: the whole set (out-of-domain)
    domain: str  # "in-domain" | "out-of-domain"


@dataclass(frozen=True)
class ScoredSet(EvalSet):
    n: int  # questions scored
    fingerprint: str  # `data.split_fingerprint` of those questions
    file_sha256: str | None  # of the SPEC's file or folder; None for a fetched copy

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScoredSet:
        return cls(
            name=data["name"],
            spec=data["spec"],
            split=data["split"],
            domain=data["domain"],
            n=int(data["n"]),
            fingerprint=data.get("fingerprint", ""),
            file_sha256=data.get("file_sha256"),
        )


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: str
    checksum: str
    kind: str
    dp: str | None = None  # its differential-privacy guarantee (evaluate.privacy), None without one


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one cell; the generation fields are None when nothing was generated."""

    loss_seconds: float
    loss_seconds_per_question: float
    generation_seconds: float | None = None
    generation_seconds_per_question: float | None = None
    new_tokens: int | None = None
    new_tokens_per_second: float | None = None

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timing:
        return cls(**data)


@dataclass(frozen=True)
class EvalCell:
    """One model on one set. `per_item[m][i]` is metric m on question `ids[i]`; `weights[m]` (loss only:
    answer tokens) turn their mean into Σ w·v / Σ w; `metrics[m]` is that mean with its interval."""

    metrics: dict[str, Interval]
    corpus: dict[str, float]  # corpus BLEU / chrF (0–100); empty without generation
    timing: Timing
    cached: dict[str, bool]  # stage (loss, generate, scores) → taken from the cache
    reference_length: float  # mean words per reference answer
    per_item: dict[str, list[float]]
    weights: dict[str, list[float]]
    ids: list[str]
    answers: list[str] | None  # None with generate=False

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": {k: v.as_dict() for k, v in self.metrics.items()},
            "corpus": self.corpus,
            "timing": self.timing.to_json(),
            "cached": self.cached,
            "reference_length": self.reference_length,
            "per_item": self.per_item,
            "weights": self.weights,
            "ids": self.ids,
            "answers": self.answers,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalCell:
        return cls(
            metrics={k: Interval(**v) for k, v in data["metrics"].items()},
            corpus=dict(data["corpus"]),
            timing=Timing.from_json(data["timing"]),
            cached=dict(data.get("cached", {})),
            reference_length=data["reference_length"],
            per_item=dict(data["per_item"]),
            weights=dict(data["weights"]),
            ids=list(data["ids"]),
            answers=data["answers"],
        )


@dataclass(frozen=True)
class Comparison:
    dataset: str  # set name
    metric: str
    a: str  # model names; the test is of stat(a) − stat(b)
    b: str
    test: PairedTest

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
        } | self.test.as_dict()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Comparison:
        test = PairedTest(**{k: data[k] for k in ("diff", "low", "high", "p_value", "n", "confidence")})
        return cls(dataset=data["dataset"], metric=data["metric"], a=data["a"], b=data["b"], test=test)


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    reference: str
    answers: dict[str, str | None]  # model name → its answer (None: not generated)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Example:
        return cls(**data)


@dataclass(frozen=True)
class CacheStats:
    dir: str | None
    hits: int
    misses: int


@dataclass(frozen=True)
class Evaluation:
    """Models × sets. Cells are addressed by (model name, set name) through `cell`."""

    models: tuple[ModelRef, ...]
    datasets: tuple[ScoredSet, ...]
    cells: dict[tuple[str, str], EvalCell]
    comparisons: tuple[Comparison, ...]
    examples: dict[str, list[Example]]  # set name → its first questions
    settings: dict[str, Any]  # every setting that decided the numbers (`runner.settings`)
    manifest: dict[str, Any]
    cache: CacheStats
    format: str = field(default=FORMAT)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def cell(self, model: str, dataset: str) -> EvalCell:
        """The cell of `model` on the set named `dataset`."""
        return self.cells[(model, dataset)]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "manifest": self.manifest,
            "settings": self.settings,
            "models": [{k: v for k, v in asdict(m).items() if k != "dp" or v} for m in self.models],
            "datasets": [s.to_json() for s in self.datasets],
            "results": {
                m.name: {s.name: self.cell(m.name, s.name).to_json() for s in self.datasets}
                for m in self.models
            },
            "comparisons": [c.to_json() for c in self.comparisons],
            "examples": {name: [e.to_json() for e in rows] for name, rows in self.examples.items()},
            "cache": asdict(self.cache),
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "results.json") -> Evaluation:
        """The evaluation of a `results.json` object; MedmergeError (naming `where`) if it is not one."""
        if not isinstance(data, dict) or not str(data.get("format", "")).startswith("medmerge-evaluation/"):
            raise MedmergeError(
                f"{where}: no 'format: medmerge-evaluation/…' (expected a `medmerge evaluate` output)"
            )
        try:
            datasets = tuple(ScoredSet.from_json(s) for s in data["datasets"])
            models = tuple(ModelRef(**m) for m in data["models"])
            cells = {
                (m.name, s.name): EvalCell.from_json(data["results"][m.name][s.name])
                for m in models
                for s in datasets
            }
            return cls(
                models=models,
                datasets=datasets,
                cells=cells,
                comparisons=tuple(Comparison.from_json(c) for c in data["comparisons"]),
                examples={k: [Example.from_json(e) for e in v] for k, v in data["examples"].items()},
                settings=dict(data["settings"]),
                manifest=dict(data.get("manifest", {})),
                cache=CacheStats(**data["cache"]),
                format=data["format"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MedmergeError(f"{where}: malformed evaluation ({type(exc).__name__}: {exc})") from None
