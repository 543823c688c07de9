"""The verdict: which merge generalizes best, by how much (paired bootstrap), and the gap it closes.

The merge is *chosen on validation loss* (never on test numbers); its test results are then compared
with the best single expert (also chosen on validation loss) and the multi-task upper bound:

    gap closed = (L_expert − L_merge) / (L_expert − L_multitask)      on mean in-domain test loss

1.0 means the merge matches the multi-task model, 0 means no better than the best expert, < 0 worse.

A stricter check is reported beside it: for each domain, the merge against the expert whose test loss
on that domain's sets is lowest *in hindsight* (an oracle choice no one could make before testing),
where that is not the expert chosen on validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medmerge.config import ExperimentConfig
from medmerge.evaluate.stats import paired_bootstrap
from medmerge.manifest import build_manifest, write_json_atomic
from medmerge.pipeline.progress import Progress

COLUMNS = (("loss", "test loss ↓"), ("rougeL", "ROUGE-L ↑"), ("bertscore_f1", "BERTScore F1 ↑"))


def _pooled(results: dict[str, Any], model: str, sets: list[str], metric: str) -> tuple[list, list | None]:
    """Per-question values of `metric` over `sets`, concatenated (with loss token weights)."""
    cells = [results["results"][model][s] for s in sets]
    if any(metric not in c["per_item"] for c in cells):
        return [], None
    values = [v for c in cells for v in c["per_item"][metric]]
    weights = [w for c in cells for w in c["weights"][metric]] if metric in cells[0]["weights"] else None
    return values, weights


def _mean(values: list[float], weights: list[float] | None) -> float | None:
    if not values:
        return None
    if weights is None:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / max(sum(weights), 1e-300)


def _compare(results, a: str, b: str, sets: list[str], metric: str, seed: int) -> dict[str, float] | None:
    va, wa = _pooled(results, a, sets, metric)
    vb, wb = _pooled(results, b, sets, metric)
    if not va or not vb:
        return None
    return paired_bootstrap(va, vb, weights_a=wa, weights_b=wb, seed=seed).as_dict()


def verdict(config: ExperimentConfig, validation: dict[str, dict], results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the verdict (see module doc)."""
    domains: dict[str, list[str]] = {"in-domain": [], "out-of-domain": []}
    for s in results["datasets"]:
        domains[s["domain"]].append(s["name"])
    evaluated = [m["name"] for m in results["models"]]
    methods = [m for m in config.methods if m in evaluated]
    experts = [e.name for e in config.experts]
    merge = min(
        methods, key=lambda m: min(validation[k]["loss"] for k in validation if k.startswith(f"{m}-"))
    )
    expert = min(experts, key=lambda e: validation[e]["loss"])
    table = []
    for model in evaluated:
        row: dict[str, Any] = {"model": model, "validation_loss": _validation_loss(validation, model)}
        for domain, sets in domains.items():
            for metric, _ in COLUMNS:
                row[f"{domain}:{metric}"] = _mean(*_pooled(results, model, sets, metric)) if sets else None
        table.append(row)
    out: dict[str, Any] = {"chosen_merge": merge, "best_expert": expert, "table": table, "comparisons": {}}
    for domain, sets in domains.items():
        if sets:
            out["comparisons"][domain] = {
                metric: _compare(results, merge, expert, sets, metric, config.search.seed)
                for metric, _ in COLUMNS
            }
    rows = {row["model"]: row for row in table}
    out["hindsight"] = {}
    for domain, sets in domains.items():
        if sets and all(rows[e][f"{domain}:loss"] is not None for e in experts):
            oracle = min(experts, key=lambda e: rows[e][f"{domain}:loss"])
            if oracle != expert:
                test = _compare(results, merge, oracle, sets, "loss", config.search.seed)
                out["hindsight"][domain] = {"expert": oracle, "loss": test}
    if config.multitask and domains["in-domain"]:
        loss = {name: row["in-domain:loss"] for name, row in rows.items()}
        gap = loss[expert] - loss["multitask"]
        out["gap"] = gap  # > 0: the multi-task model beats the best expert, so there is a gap to close
        out["gap_closed"] = (loss[expert] - loss[merge]) / gap if gap > 0 else None
    return out


def _validation_loss(validation: dict[str, dict], model: str) -> float | None:
    keys = [k for k in validation if k == model or k.startswith(f"{model}-")]
    return min(validation[k]["loss"] for k in keys) if keys else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_markdown(v: dict[str, Any]) -> str:
    """Models × (validation loss, in-domain and OOD test metrics) as a Markdown table."""
    domains = [
        d for d in ("in-domain", "out-of-domain") if any(r.get(f"{d}:loss") is not None for r in v["table"])
    ]
    head = ["model", "val loss ↓"] + [f"{d} {label}" for d in domains for _, label in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in v["table"]:
        name = row["model"] + (" (chosen merge)" if row["model"] == v["chosen_merge"] else "")
        name += " (best expert)" if row["model"] == v["best_expert"] else ""
        cells = [name, _fmt(row["validation_loss"])]
        cells += [_fmt(row.get(f"{d}:{metric}")) for d in domains for metric, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _versus(test: dict[str, float], whom: str) -> str:
    """'lower than X's (Δ = …, 95% CI […], p = …: significant)' for a paired test of merge − X."""
    significant = test["high"] < 0 or test["low"] > 0
    than = f" than {whom}'s" if whom else ""
    return (
        f"{'lower' if test['diff'] < 0 else 'not lower'}{than} "
        f"(Δ = {test['diff']:+.4f} nats/token, 95% CI [{test['low']:+.4f}, {test['high']:+.4f}], "
        f"p = {test['p_value']:.3f}: {'significant' if significant else 'not significant'})"
    )


def summary_lines(v: dict[str, Any]) -> list[str]:
    """Plain sentences: did the chosen merge beat the best expert, significantly, and the gap closed."""
    lines = [
        f"Chosen merge (lowest validation loss): {v['chosen_merge']}; best single expert: {v['best_expert']}."
    ]
    for domain, comparisons in v["comparisons"].items():
        test = comparisons.get("loss")
        if test is not None:
            lines.append(f"{domain}: the merge's test loss is {_versus(test, 'the best expert')}.")
        oracle = v.get("hindsight", {}).get(domain)
        if oracle is not None and oracle["loss"] is not None:
            who = f"the expert best on these sets in hindsight, {oracle['expert']}"
            lines.append(f"{domain}: against {who}, the merge's test loss is {_versus(oracle['loss'], '')}.")

    if v.get("gap_closed") is not None:
        lines.append(
            f"Gap between best expert and multi-task model ({v['gap']:.4f} nats/token of in-domain "
            f"test loss) closed by the merge: {100 * v['gap_closed']:.1f}%."
        )
    elif "gap" in v:
        lines.append(
            f"The multi-task model is not better than the best expert on in-domain test loss "
            f"(Δ = {-v['gap']:+.4f}), so there is no gap for the merge to close."
        )
    return lines


def write_verdict(config, out: Path, validation, results, show: Progress) -> Path:
    """verdict.json, report.md (verdict + link to the evaluation report) and the terminal table."""
    show.start("verdict")
    v = verdict(config, validation, results)
    write_json_atomic(out / "verdict.json", build_manifest("verdict", inputs={}, config=config, verdict=v))
    text = "\n".join(
        [
            "# medmerge run — verdict",
            "",
            *summary_lines(v),
            "",
            table_markdown(v),
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
