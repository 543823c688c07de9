"""What a verdict is made of, for `medmerge run` (medmerge.pipeline.verdict) and a federated study
(medmerge.federated.verdict) alike: one row per evaluated model, the chosen merge against the best
expert (both chosen on validation loss), the expert best in hindsight, and how they read in words and
as a Markdown table.

Per (domain, metric), a model's value is the mean over the domain's sets pooled question by question
(loss token-weighted, nats/token); the paired bootstrap (medmerge.evaluate.stats) tests a − b
question by question. The gap closed (with a multi-task model) is

    gap closed = (L_expert − L_merge) / (L_expert − L_multitask)      on mean in-domain test loss
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medmerge.evaluate.by_method import FamilyTest, MethodGap, family_lines
from medmerge.evaluate.privacy import DP_NOTE
from medmerge.evaluate.records import Evaluation
from medmerge.evaluate.stats import PairedTest, paired_bootstrap

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


def pooled(evaluation: Evaluation, model: str, sets: list[str], metric: str) -> tuple[list, list | None]:
    """Per-question values of `metric` over `sets`, concatenated (with loss token weights)."""
    cells = [evaluation.cell(model, s) for s in sets]
    if metric in dict(OPTIONAL_COLUMNS):
        cells = [c for c in cells if metric in c.per_item]
    if not cells or any(metric not in c.per_item for c in cells):
        return [], None
    values = [v for c in cells for v in c.per_item[metric]]
    weights = [w for c in cells for w in c.weights[metric]] if metric in cells[0].weights else None
    return values, weights


def mean(values: list[float], weights: list[float] | None) -> float | None:
    """Σ w·v / Σ w (plain mean without weights); None for no values."""
    if not values:
        return None
    if weights is None:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / max(sum(weights), 1e-300)


def compare(
    evaluation: Evaluation, a: str, b: str, sets: list[str], metric: str, seed: int
) -> PairedTest | None:
    va, wa = pooled(evaluation, a, sets, metric)
    vb, wb = pooled(evaluation, b, sets, metric)
    if not va or not vb:
        return None
    return paired_bootstrap(va, vb, weights_a=wa, weights_b=wb, seed=seed)


def columns(evaluation: Evaluation) -> tuple[tuple[str, str], ...]:
    """COLUMNS, plus each optional column that some cell of the evaluation has."""
    cells = evaluation.cells.values()
    return COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(c[0] in cell.per_item for cell in cells))


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


def versus(test: PairedTest, whom: str) -> str:
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


def gap_line(v: Verdict) -> str | None:
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
            lines.append(f"{domain}: the merge's test loss is {versus(test, 'the best expert')}.")
        oracle = v.hindsight.get(domain)
        if oracle is not None and oracle.loss is not None:
            who = f"the expert best on these sets in hindsight, {oracle.expert}"
            lines.append(f"{domain}: against {who}, the merge's test loss is {versus(oracle.loss, '')}.")
    if any(row.dp for row in v.table):
        lines.append(DP_NOTE)
    gap = gap_line(v)
    if gap is not None:
        lines.append(gap)
    lines += family_lines(list(v.families), lambda test: versus(test, ""))
    return lines
