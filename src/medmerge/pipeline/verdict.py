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
from pathlib import Path

from medmerge.config import ExperimentConfig
from medmerge.errors import MedmergeError
from medmerge.evaluate.by_method import family_tests, method_gaps
from medmerge.evaluate.by_method import markdown as by_method_markdown
from medmerge.evaluate.records import Evaluation
from medmerge.evaluate.verdict import (
    DOMAINS,
    Hindsight,
    Verdict,
    VerdictRow,
    columns,
    compare,
    mean,
    pooled,
    summary_lines,
    table_markdown,
)
from medmerge.manifest import build_manifest, write_json_atomic
from medmerge.pipeline.progress import Progress
from medmerge.pipeline.records import ValidationRecord

__all__ = ["Verdict", "VerdictRow", "merge_candidates", "summary_lines", "table_markdown", "verdict"]


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


def verdict(
    config: ExperimentConfig, validation: Mapping[str, ValidationRecord], evaluation: Evaluation
) -> Verdict:
    """The numbers of the verdict (see module doc)."""
    domains: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for s in evaluation.datasets:
        domains[s.domain].append(s.name)
    evaluated = evaluation.model_names
    metrics = columns(evaluation)
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
                (domain, metric): mean(*pooled(evaluation, model, sets, metric)) if sets else None
                for domain, sets in domains.items()
                for metric, _ in metrics
            },
            dp=dp[model],
        )
        for model in evaluated
    )
    seed = config.search.seed
    comparisons = {
        domain: {metric: compare(evaluation, merge, expert, sets, metric, seed) for metric, _ in metrics}
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
                hindsight[domain] = Hindsight(oracle, compare(evaluation, merge, oracle, sets, "loss", seed))
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
        lambda a, b, domain: compare(evaluation, a, b, domains[domain], "loss", seed),
        present,
    )
    return Verdict(
        merge, expert, table, comparisons, hindsight, gap, gap_closed, tuple(by_method), tuple(families)
    )


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
