"""The verdict: which merge generalizes best, by how much (paired bootstrap), and the gap it closes.

The merge is *chosen on validation loss* (never on test numbers); its test results are then compared
with the best single expert (also chosen on validation loss) and the multi-task upper bound:

    gap closed = (L_expert − L_merge) / (L_expert − L_multitask)      on mean in-domain test loss

1.0 means the merge matches the multi-task model, 0 means no better than the best expert, < 0 worse.
A method's validation loss is the lowest of its candidates, exactly `f"{method}-{space}"` for the
experiment's spaces (an expert named `ties-x` is not a TIES candidate).

A stricter check is reported beside it: for each domain, the merge against the expert whose test loss
on that domain's sets is lowest *in hindsight* (an oracle choice no one could make before testing),
where that is not the expert chosen on validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmerge.config import ExperimentConfig
from medmerge.errors import MedmergeError
from medmerge.evaluate.privacy import DP_NOTE
from medmerge.evaluate.records import Evaluation
from medmerge.evaluate.stats import PairedTest, paired_bootstrap
from medmerge.manifest import build_manifest, write_json_atomic
from medmerge.pipeline.by_method import FamilyTest, MethodGap, family_lines, family_tests, method_gaps
from medmerge.pipeline.by_method import markdown as by_method_markdown
from medmerge.pipeline.progress import Progress
from medmerge.pipeline.records import ValidationRecord

COLUMNS = (("loss", "test loss ↓"), ("rougeL", "ROUGE-L ↑"), ("bertscore_f1", "BERTScore F1 ↑"))
# scored only on some sets (those with PubMedQA labels): a column where present, pooled over those sets
OPTIONAL_COLUMNS = (("accuracy", "PubMedQA accuracy ↑"),)
DOMAINS = ("in-domain", "out-of-domain")


@dataclass(frozen=True)
class VerdictRow:
    """One evaluated model: its validation loss and, per (domain, metric), the mean over the domain's
    sets pooled question by question (loss: token-weighted, nats/token); None where not scored."""

    model: str
    validation_loss: float | None
    values: dict[tuple[str, str], float | None]
    dp: str | None = None  # differential-privacy guarantee (medmerge.evaluate.privacy), None without one

    def value(self, domain: str, metric: str) -> float | None:
        return self.values.get((domain, metric))

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"model": self.model, "validation_loss": self.validation_loss}
        row |= {"dp": self.dp} if self.dp else {}
        return row | {f"{domain}:{metric}": v for (domain, metric), v in self.values.items()}


@dataclass(frozen=True)
class Hindsight:
    """The expert best on a domain's test sets in hindsight, and the merge − expert test-loss test."""

    expert: str
    loss: PairedTest | None


@dataclass(frozen=True)
class Verdict:
    chosen_merge: str  # method whose best candidate has the lowest validation loss
    best_expert: str  # expert with the lowest validation loss
    table: tuple[VerdictRow, ...]
    comparisons: dict[str, dict[str, PairedTest | None]]  # domain → metric → merge − best expert
    hindsight: dict[str, Hindsight]  # domain → oracle expert, where it is not the best expert
    gap: float | None = None  # L_expert − L_multitask (in-domain test loss); None: no multi-task model
    gap_closed: float | None = None  # module doc; None where gap ≤ 0
    by_method: tuple[MethodGap, ...] = ()  # every evaluated method's gap closed per domain (by_method)
    families: tuple[FamilyTest, ...] = ()  # each family's best merge − the data-free best

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "chosen_merge": self.chosen_merge,
            "best_expert": self.best_expert,
            "table": [row.to_json() for row in self.table],
            "comparisons": {
                domain: {metric: None if t is None else t.as_dict() for metric, t in tests.items()}
                for domain, tests in self.comparisons.items()
            },
            "hindsight": {
                domain: {"expert": h.expert, "loss": None if h.loss is None else h.loss.as_dict()}
                for domain, h in self.hindsight.items()
            },
        }
        if self.gap is not None:
            out |= {"gap": self.gap, "gap_closed": self.gap_closed}
        out["by_method"] = [g.to_json() for g in self.by_method]
        out["families"] = [t.to_json() for t in self.families]
        return out


def merge_candidates(config: ExperimentConfig, method: str) -> list[str]:
    """Validation names of a method's merges: exactly `method-space` for each of the experiment's spaces."""
    return [f"{method}-{space}" for space in config.spaces]


def _validation_loss(
    config: ExperimentConfig, validation: Mapping[str, ValidationRecord], model: str
) -> float | None:
    """A model's validation loss (nats/token); for a merge method, the lowest of its candidates."""
    names = merge_candidates(config, model) if model in config.methods else [model]
    losses = [validation[name].loss for name in names if name in validation]
    return min(losses) if losses else None


def _pooled(evaluation: Evaluation, model: str, sets: list[str], metric: str) -> tuple[list, list | None]:
    """Per-question values of `metric` over `sets`, concatenated (with loss token weights)."""
    cells = [evaluation.cell(model, s) for s in sets]
    if metric in dict(OPTIONAL_COLUMNS):
        cells = [c for c in cells if metric in c.per_item]
    if not cells or any(metric not in c.per_item for c in cells):
        return [], None
    values = [v for c in cells for v in c.per_item[metric]]
    weights = [w for c in cells for w in c.weights[metric]] if metric in cells[0].weights else None
    return values, weights


def _mean(values: list[float], weights: list[float] | None) -> float | None:
    """Σ w·v / Σ w (plain mean without weights); None for no values."""
    if not values:
        return None
    if weights is None:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / max(sum(weights), 1e-300)


def _compare(
    evaluation: Evaluation, a: str, b: str, sets: list[str], metric: str, seed: int
) -> PairedTest | None:
    va, wa = _pooled(evaluation, a, sets, metric)
    vb, wb = _pooled(evaluation, b, sets, metric)
    if not va or not vb:
        return None
    return paired_bootstrap(va, vb, weights_a=wa, weights_b=wb, seed=seed)


def _columns(evaluation: Evaluation) -> tuple[tuple[str, str], ...]:
    """COLUMNS, plus each optional column that some cell of the evaluation has."""
    cells = evaluation.cells.values()
    return COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(c[0] in cell.per_item for cell in cells))


def verdict(
    config: ExperimentConfig, validation: Mapping[str, ValidationRecord], evaluation: Evaluation
) -> Verdict:
    """The numbers of the verdict (see module doc)."""
    domains: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for s in evaluation.datasets:
        domains[s.domain].append(s.name)
    evaluated = evaluation.model_names
    columns = _columns(evaluation)
    dp = {m.name: m.dp for m in evaluation.models}
    scored = {m: _validation_loss(config, validation, m) for m in config.methods if m in evaluated}
    methods = [m for m, loss in scored.items() if loss is not None]
    if not methods:
        raise MedmergeError(f"verdict: no validation loss for any evaluated merge of {config.methods}")
    merge = min(methods, key=lambda m: scored[m])
    expert = min((e.name for e in config.experts), key=lambda e: validation[e].loss)
    table = tuple(
        VerdictRow(
            model=model,
            validation_loss=_validation_loss(config, validation, model),
            values={
                (domain, metric): _mean(*_pooled(evaluation, model, sets, metric)) if sets else None
                for domain, sets in domains.items()
                for metric, _ in columns
            },
            dp=dp[model],
        )
        for model in evaluated
    )
    seed = config.search.seed
    comparisons = {
        domain: {metric: _compare(evaluation, merge, expert, sets, metric, seed) for metric, _ in columns}
        for domain, sets in domains.items()
        if sets
    }
    rows = {row.model: row for row in table}
    experts = [e.name for e in config.experts]
    hindsight = {}
    for domain, sets in domains.items():
        if sets and all(rows[e].value(domain, "loss") is not None for e in experts):
            oracle = min(experts, key=lambda e: rows[e].value(domain, "loss"))
            if oracle != expert:
                hindsight[domain] = Hindsight(oracle, _compare(evaluation, merge, oracle, sets, "loss", seed))
    gap = gap_closed = None
    if config.multitask and domains["in-domain"]:
        loss = {name: row.value("in-domain", "loss") for name, row in rows.items()}
        gap = loss[expert] - loss["multitask"]  # > 0: the multi-task model beats the best expert
        gap_closed = (loss[expert] - loss[merge]) / gap if gap > 0 else None
    present = [d for d, sets in domains.items() if sets]
    losses = {name: {d: row.value(d, "loss") for d in present} for name, row in rows.items()}
    by_method = method_gaps(losses, {m: scored[m] for m in methods}, expert, present)
    families = family_tests(
        {m: scored[m] for m in methods},
        lambda a, b, domain: _compare(evaluation, a, b, domains[domain], "loss", seed),
        present,
    )
    return Verdict(
        merge, expert, table, comparisons, hindsight, gap, gap_closed, tuple(by_method), tuple(families)
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_markdown(v: Verdict) -> str:
    """Models × (validation loss, in-domain and OOD test metrics) as a Markdown table."""
    domains = [d for d in DOMAINS if any(r.value(d, "loss") is not None for r in v.table)]
    private = any(row.dp for row in v.table)  # the DP column only where some model has a guarantee
    columns = {
        d: COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(r.value(d, c[0]) is not None for r in v.table))
        for d in domains
    }
    head = ["model", "val loss ↓"] + [f"{d} {label}" for d in domains for _, label in columns[d]]
    head += ["differential privacy"] if private else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in v.table:
        name = row.model + (" (chosen merge)" if row.model == v.chosen_merge else "")
        name += " (best expert)" if row.model == v.best_expert else ""
        cells = [name, _fmt(row.validation_loss)]
        cells += [_fmt(row.value(d, metric)) for d in domains for metric, _ in columns[d]]
        cells += [row.dp or "–"] if private else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _versus(test: PairedTest, whom: str) -> str:
    """'lower than X's (Δ = …, 95% CI […], p = …: significant)' for a paired test of merge − X; an
    interval that straddles zero is said to be no evidence either way."""
    if test.high < 0:
        meaning = "significant"
    elif test.low > 0:
        meaning = "significantly higher"
    else:
        meaning = "not significant: the interval straddles zero, so no evidence either way"
    than = f" than {whom}'s" if whom else ""
    return (
        f"{'lower' if test.diff < 0 else 'not lower'}{than} "
        f"(Δ = {test.diff:+.4f} nats/token, 95% CI [{test.low:+.4f}, {test.high:+.4f}], "
        f"p = {test.p_value:.3f}: {meaning})"
    )


def _gap_line(v: Verdict) -> str | None:
    """The gap closed, in words: a share in [0, 1], beating the multi-task model, or worse than the expert."""
    if v.gap is None:
        return None
    if v.gap_closed is None:
        return (
            f"The multi-task model is not better than the best expert on in-domain test loss "
            f"(Δ = {-v.gap:+.4f}), so there is no gap for the merge to close."
        )
    gap = f"the multi-task model's in-domain test loss is {v.gap:.4f} nats/token below the best expert's"
    if v.gap_closed > 1:
        beyond = (v.gap_closed - 1) * v.gap
        return (
            f"The merge beats the multi-task model (trained on the pooled data) on in-domain test loss, "
            f"by {beyond:.4f} nats/token ({gap})."
        )
    if v.gap_closed < 0:
        worse = "The merge is worse than the best expert on in-domain test loss"
        return f"{worse}, so it closes none of the gap ({gap})."
    return (
        f"Gap between best expert and multi-task model ({v.gap:.4f} nats/token of in-domain "
        f"test loss) closed by the merge: {100 * v.gap_closed:.1f}% "
        "(0% = no better than the best expert, 100% = as good as the multi-task model)."
    )


def summary_lines(v: Verdict) -> list[str]:
    """Plain sentences: did the chosen merge beat the best expert, significantly, and the gap closed."""
    lines = [f"Chosen merge (lowest validation loss): {v.chosen_merge}; best single expert: {v.best_expert}."]
    for domain, comparisons in v.comparisons.items():
        test = comparisons.get("loss")
        if test is not None:
            lines.append(f"{domain}: the merge's test loss is {_versus(test, 'the best expert')}.")
        oracle = v.hindsight.get(domain)
        if oracle is not None and oracle.loss is not None:
            who = f"the expert best on these sets in hindsight, {oracle.expert}"
            lines.append(f"{domain}: against {who}, the merge's test loss is {_versus(oracle.loss, '')}.")
    if any(row.dp for row in v.table):
        lines.append(DP_NOTE)
    gap = _gap_line(v)
    if gap is not None:
        lines.append(gap)
    lines += family_lines(list(v.families), lambda test: _versus(test, ""))
    return lines


def write_verdict(
    config: ExperimentConfig,
    out: Path,
    validation: Mapping[str, ValidationRecord],
    evaluation: Evaluation,
    show: Progress,
) -> Path:
    """verdict.json, report.md (verdict + link to the evaluation report) and the terminal table."""
    show.start("verdict")
    v = verdict(config, validation, evaluation)
    write_json_atomic(
        out / "verdict.json", build_manifest("verdict", inputs={}, config=config, verdict=v.to_json())
    )
    text = "\n".join(
        [
            "# medmerge run — verdict",
            "",
            *summary_lines(v),
            "",
            table_markdown(v),
            "",
            "## Every method: the share of the best-expert-to-multi-task gap it closes",
            "",
            by_method_markdown(list(v.by_method), [d for d in DOMAINS if d in v.comparisons]),
            "",
            "Full generalization matrix with confidence intervals, heatmap and examples: "
            "[evaluation/report.md](evaluation/report.md). Search trials: `search/*.json`.",
            "",
        ]
    )
    tmp = out / ".report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
    if show.enabled:
        print(table_markdown(v))
        print("\n".join(summary_lines(v)))
    show.done("verdict")
    return out / "report.md"
