"""The evaluation report: results.json → report.md, heatmap.png (models × sets), averages.png.

`render_report(dir)` needs nothing but `dir/results.json`, so a report can be re-rendered (new layout,
other examples) without touching a model. Tables: one per metric, models × sets, `mean [low, high]`
(bootstrap interval), best per column in bold; in-domain test splits first, then out-of-domain sets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medmerge.errors import MedmergeError
from medmerge.evaluate.metrics import METRICS
from medmerge.evaluate.privacy import DP_NOTE
from medmerge.evaluate.records import Evaluation, ScoredSet
from medmerge.evaluate.stats import Interval
from medmerge.manifest import atomic_dir, write_json_atomic

HEADLINE = ("rougeL", "bertscore_f1", "loss")  # drawn in the heatmap and the bar chart
DECIMALS = {"loss": 3, "perplexity": 2, "bleu": 2, "chrf": 2, "length": 1}


def write_evaluation(results: Evaluation, out: str | Path, overwrite: bool = False) -> Path:
    """Write results.json and the rendered report into `out`, atomically (the folder appears complete)."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "results.json", results.to_json())
        _render(results, tmp)
    return out


def render_report(folder: str | Path) -> Path:
    """Re-render report.md and the PNGs of `folder` from its results.json alone; returns report.md."""
    folder = Path(folder)
    path = folder / "results.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise MedmergeError(
            f"{path}: cannot read ({exc.strerror}); expected a `medmerge evaluate` output"
        ) from None
    except json.JSONDecodeError as exc:
        raise MedmergeError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    _render(Evaluation.from_json(data, where=str(path)), folder)
    return folder / "report.md"


def _render(results: Evaluation, folder: Path) -> None:
    models = results.model_names
    sets = results.datasets
    heatmap(results, folder / "heatmap.png")
    averages_chart(results, folder / "averages.png")
    text = markdown(results, models, sets)
    tmp = folder / ".report.md.tmp"
    tmp.write_text(text)
    tmp.replace(folder / "report.md")


# ------------------------------------------------------------------------------------------ tables


def _fmt(metric: str, value: float) -> str:
    return f"{value:.{DECIMALS.get(metric, 3)}f}"


def _set_header(s: ScoredSet) -> str:
    where = s.split if s.domain == "in-domain" else "OOD"
    return f"{s.name} ({where}, n={s.n})"


def _cell(results: Evaluation, model: str, s: str, metric: str) -> Interval | None:
    """`metric`'s mean and interval for `model` on the set named `s`; None where it was not scored."""
    return results.cell(model, s).metrics.get(metric)


def _averages(
    results: Evaluation, model: str, sets: Sequence[ScoredSet], metric: str
) -> dict[str, float | None]:
    """Unweighted mean over sets of the per-set means: in-domain, out-of-domain, all."""
    out: dict[str, float | None] = {}
    for label, keep in (("avg in-domain", "in-domain"), ("avg OOD", "out-of-domain"), ("avg all", None)):
        vals = [
            c.mean
            for s in sets
            if keep in (None, s.domain) and (c := _cell(results, model, s.name, metric)) is not None
        ]
        out[label] = sum(vals) / len(vals) if vals else None
    return out


def metric_table(results: Evaluation, models: list[str], sets: Sequence[ScoredSet], metric: str) -> str:
    """Markdown table models × sets (+ averages) of one metric; best per column in bold."""
    domains = {s.domain for s in sets}
    avg_cols = ["avg all"] if len(domains) == 1 else ["avg in-domain", "avg OOD", "avg all"]
    direction = METRICS[metric][1]
    header = ["model"] + [_set_header(s) for s in sets] + avg_cols
    rows: list[list[str]] = [[f"`{m}`"] for m in models]
    columns: list[list[float | None]] = []
    for s in sets:
        columns.append([c.mean if c else None for m in models for c in [_cell(results, m, s.name, metric)]])
    for col in avg_cols:
        columns.append([_averages(results, m, sets, metric)[col] for m in models])
    for j, col in enumerate(columns):
        present = [v for v in col if v is not None]
        best = (
            (max(present) if direction > 0 else min(present))
            if present and direction and len(models) > 1
            else None
        )
        for i, m in enumerate(models):
            v = col[i]
            if v is None:
                rows[i].append("–")
                continue
            text = _fmt(metric, v)
            if j < len(sets):
                c = _cell(results, m, sets[j].name, metric)
                text += f" [{_fmt(metric, c.low)}, {_fmt(metric, c.high)}]"
            rows[i].append(f"**{text}**" if best is not None and v == best else text)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def timing_table(results: Evaluation, models: list[str], sets: Sequence[ScoredSet]) -> str:
    """Seconds per question (generation, loss), new tokens per second and cache hits of every cell."""
    header = ["model", "set", "s / question (generate)", "new tokens / s", "s / question (loss)", "cached"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        for s in sets:
            r = results.cell(m, s.name)
            t = r.timing
            gen = f"{t.generation_seconds_per_question:.2f}" if t.generation_seconds is not None else "–"
            tps = f"{t.new_tokens_per_second:.1f}" if t.new_tokens_per_second is not None else "–"
            cached = ", ".join(k for k, v in r.cached.items() if v) or "no"
            lines.append(
                f"| `{m}` | {s.name} | {gen} | {tps} | {t.loss_seconds_per_question:.3f} | {cached} |"
            )
    return "\n".join(lines)


def comparison_table(results: Evaluation, confidence: float) -> str:
    """Every paired test a − b: difference, interval, p-value (floor 2 / resamples) and who is better."""
    alpha = 1 - confidence
    header = ["set", "metric", "a", "b", "a − b", f"{confidence:.0%} interval", "p", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in results.comparisons:
        t, m = c.test, c.metric
        direction = METRICS[m][1]
        if t.p_value < alpha and t.diff != 0:
            winner = c.a if (t.diff > 0) == (direction > 0) else c.b
            verdict = f"`{winner}` better"
        else:
            verdict = "no significant difference"
        p = f"{t.p_value:.3f}" if t.p_value > 0 else f"< {2 / results.settings['bootstrap_resamples']:.3f}"
        lines.append(
            f"| {c.dataset} | {m} | `{c.a}` | `{c.b}` | {_fmt(m, t.diff)} | "
            f"[{_fmt(m, t.low)}, {_fmt(m, t.high)}] | {p} | {verdict} |"
        )
    return "\n".join(lines)


def _quote(text: str | None, limit: int = 600) -> str:
    if text is None:
        return "_(not generated)_"
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|") or "_(empty)_"


def markdown(results: Evaluation, models: list[str], sets: Sequence[ScoredSet]) -> str:
    """The whole report.md: settings, models, sets, one table per metric, time, tests, examples."""
    st = results.settings
    decoding = (
        f"sampling (T={st['temperature']}, top-p={st['top_p']}, seed {st['seed']})"
        if st["do_sample"]
        else "greedy"
    )
    out = [
        "# medmerge evaluation report",
        "",
        f"Models: {len(models)}; question sets: {len(sets)}. Decoding: {decoding}, "
        f"max {st['max_new_tokens']} new tokens, prompts cut to their last {st['max_prompt_tokens']} tokens. "
        "Intervals: "
        f"{st['confidence']:.0%} {st['intervals']}.",
        "",
        f"BERTScore uses {st['bertscore_encoder']} (idf={st['bertscore_idf']}): **not the roberta-large "
        "backbone of published BERTScore numbers**; compare these only with each other.",
        "",
        "## Models",
        "",
        "| model | kind | path | checksum | differential privacy |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| `{m.name}` | {m.kind} | `{m.path}` | `{m.checksum[:12]}` | {m.dp or '–'} |"
        for m in results.models
    ]
    if any(m.dp for m in results.models):
        out += ["", DP_NOTE]
    out += [
        "",
        "## Question sets",
        "",
        "| set | domain | SPEC | split | questions |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {s.name} | {s.domain} | `{s.spec}` | {s.split or 'whole set'} | {s.n} |" for s in sets]
    out += ["", "## Overview", "", "![heatmap](heatmap.png)", "", "![averages](averages.png)", ""]
    for metric, (label, direction) in METRICS.items():
        if not any(_cell(results, m, s.name, metric) for m in models for s in sets):
            continue
        better = {1: "higher is better", -1: "lower is better", 0: "no better direction"}[direction]
        out += [f"## {label} ({better})", "", metric_table(results, models, sets, metric), ""]
        if metric == "accuracy" and "accuracy" in st:
            out += [st["accuracy"] + ".", ""]
        if metric == "length":
            ref = ", ".join(f"{s.name} {results.cell(models[0], s.name).reference_length:.1f}" for s in sets)
            out += [f"Reference answers, mean words: {ref}.", ""]
    out += ["## Corpus-level BLEU / chrF", "", "| model | set | BLEU | chrF |", "|---|---|---|---|"]
    for m in models:
        for s in sets:
            c = results.cell(m, s.name).corpus
            if c:
                out.append(f"| `{m}` | {s.name} | {c['bleu']:.2f} | {c['chrf']:.2f} |")
    out += ["", "## Time", "", timing_table(results, models, sets), ""]
    if results.comparisons:
        out += [
            "## Paired bootstrap tests (same questions)",
            "",
            comparison_table(results, st["confidence"]),
            "",
        ]
    out += ["## Example answers", ""]
    for s in sets:
        for ex in results.examples.get(s.name, []):
            out += [f"### {s.name} · {ex.id}", "", f"**Question.** {_quote(ex.question)}", ""]
            out += [f"**Reference.** {_quote(ex.reference)}", ""]
            out += [f"**`{m}`.** {_quote(a)}" + "\n" for m, a in ex.answers.items()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ charts


def heatmap(results: Evaluation, path: Path) -> None:
    """One panel per headline metric: models × sets, value in each cell, brighter = better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = results.model_names
    sets = results.datasets
    metrics = [m for m in HEADLINE if _cell(results, models[0], sets[0].name, m)]
    n_in = sum(s.domain == "in-domain" for s in sets)
    width = max(3.8, 1.1 * len(sets) + 2.4)  # inches per panel
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(width * len(metrics), 1.9 + 0.45 * len(models)), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        grid = np.array([[_cell(results, m, s.name, metric).mean for s in sets] for m in models])
        cmap = "viridis" if METRICS[metric][1] >= 0 else "viridis_r"
        image = ax.imshow(grid, cmap=cmap, aspect="auto")
        span = np.nanmax(grid) - np.nanmin(grid)
        for i in range(len(models)):
            for j in range(len(sets)):
                norm = (grid[i, j] - np.nanmin(grid)) / span if span > 0 else 0.5
                bright = norm > 0.5 if METRICS[metric][1] >= 0 else norm < 0.5
                ax.text(
                    j,
                    i,
                    _fmt(metric, grid[i, j]),
                    ha="center",
                    va="center",
                    color="black" if bright else "white",
                )
        ax.set_xticks(
            range(len(sets)), [s.name + ("" if s.domain == "in-domain" else "\n(OOD)") for s in sets]
        )
        ax.set_yticks(range(len(models)), models)
        if 0 < n_in < len(sets):
            ax.axvline(n_in - 0.5, color="white", linewidth=3)
        ax.set_title(METRICS[metric][0])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("mean over questions, models × question sets (brighter = better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def averages_chart(results: Evaluation, path: Path) -> None:
    """Bars: each model's mean over all sets of each headline metric; dots: the per-set means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results.model_names
    sets = results.datasets
    metrics = [m for m in HEADLINE if _cell(results, models[0], sets[0].name, m)]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(max(3.5, 0.9 * len(models) + 2) * len(metrics), 4), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        avgs = [_averages(results, m, sets, metric)["avg all"] for m in models]
        ax.bar(range(len(models)), avgs, color="tab:blue", alpha=0.75)
        for j, s in enumerate(sets):
            ys = [_cell(results, m, s.name, metric).mean for m in models]
            ax.scatter(range(len(models)), ys, s=18, zorder=3, label=s.name, marker="os^Dvx*"[j % 7])
        ax.set_xticks(
            range(len(models)),
            models,
            rotation=20 if len(models) > 3 else 0,
            ha="right" if len(models) > 3 else "center",
        )
        better = {1: "higher is better", -1: "lower is better", 0: ""}[METRICS[metric][1]]
        ax.set_title(f"{METRICS[metric][0]}\nmean over sets ({better})", fontsize=10)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
