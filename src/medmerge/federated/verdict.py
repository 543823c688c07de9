"""The federated verdict, from site-reported numbers only, with the statistics of `medmerge run`
(medmerge.evaluate.verdict, on the sites' reports pooled into one Evaluation): the merge chosen on
federated validation loss against the best single expert (also chosen on validation), per domain — in
domain: the expert sites' test splits; out of domain: the `ood` sets at sites and evaluate-only nodes —
pooled question by question (loss token-weighted, nats/token; PubMedQA accuracy; ROUGE-L and BERTScore
when the sites generate). Where the study lets sites send per-question values
(`federation.per_question`, losses only): paired bootstrap tests of the loss and the expert best in
hindsight, as in `medmerge run`; otherwise, and for the other metrics, differences of pooled means
only. The objective caps each site's self-reported weight (federation.weight_cap; `capped`). No
multi-task model can exist in a federation (it would pool the data), so there is no gap closed; FedAvg
is the joint-training baseline.

Leave-one-site-out rows (`federation.leave_one_out`): for each expert site, the merge searched over the
other sites' adapters and validation splits, scored by the held-out site on its own test split, against
the best other expert (chosen on the others' validation) and the base. Also: dropped sites (which step,
when, why), bytes sent per site and approach, FedAvg, the SHA-256 of every merge as the sites scored it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medmerge.federated.config import FederatedConfig
from medmerge.manifest import build_manifest, write_json_atomic

IN, OUT = "in-domain", "out-of-domain"


def capped(values: dict[str, float], cap: float) -> dict[str, float]:
    """Each site's self-reported weight clipped to at most `cap` × the median of all sites' values
    (federation.weight_cap): with at least three sites and a majority honest, no one site's claim
    weighs more than `cap` honest sites' median. With two sites and cap ≥ 2 nothing is clipped."""
    if not values:
        return {}
    ordered = sorted(values.values())
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {s: min(v, cap * median) for s, v in values.items()}


def objective(numbers: dict[str, dict[str, Any]], kind: str, cap: float | None = None) -> float:
    """Validation loss of a recipe from the sites' Σ nll and tokens (nats/token): `tokens`, the
    token-weighted mean of the sites' means, each site's tokens capped (`capped`, with `cap`; without
    clipping exactly Σ nll / Σ tokens); `sites`, the mean of the site means; `worst_site`, their max.
    inf (a failed trial) when a site's loss was not finite there (nll_sum None) or no site scored."""
    if not numbers or any(n["nll_sum"] is None for n in numbers.values()):
        return math.inf
    means = {s: n["nll_sum"] / max(n["tokens"], 1) for s, n in numbers.items()}
    if kind == "tokens":
        tokens = {s: float(n["tokens"]) for s, n in numbers.items()}
        weights = capped(tokens, cap) if cap is not None else tokens
        total = sum(
            n["nll_sum"] if weights[s] == tokens[s] else weights[s] * means[s] for s, n in numbers.items()
        )
        return total / max(sum(weights.values()), 1)
    return sum(means.values()) / len(means) if kind == "sites" else max(means.values())


def _site_cells(reply: Any, model: str, domain: str) -> list[Any]:
    return [reply.cells[s.name][model] for s in reply.sets if s.domain == domain]


def site_loss(reply: Any, model: str, domain: str = IN) -> float | None:
    """A site's pooled loss of `model` over its sets of `domain` (Σ nll / Σ tokens); None: no such set."""
    sums = [cell.sums["loss"] for cell in _site_cells(reply, model, domain)]
    return sum(s for s, _ in sums) / max(sum(w for _, w in sums), 1) if sums else None


def _loss_vectors(reply: Any, model: str) -> tuple[list[float], list[float]]:
    """Per-question losses and token weights of `model` on a site's in-domain sets."""
    cells = _site_cells(reply, model, IN)
    return [v for c in cells for v in c.per_item["loss"]], [w for c in cells for w in c.weights["loss"]]


def evaluation_of(results: dict[str, Any], models: list[str], per_question: bool) -> Any:
    """The sites' reports as one medmerge Evaluation: a set per (site, set), named `site:set`. Each cell
    holds the per-question losses where the sites sent them (`per_question`), and otherwise one pooled
    value per metric, weighted by its Σ w."""
    from medmerge.evaluate.records import CacheStats, EvalCell, Evaluation, ModelRef, ScoredSet, Timing
    from medmerge.evaluate.stats import Interval

    datasets, cells = [], {}
    for site, reply in results.items():
        for s in reply.sets:
            name, split = f"{site}:{s.name}", "test" if s.domain == IN else None
            datasets.append(ScoredSet(name, "", split, s.domain, s.n, "", None))
            for model in models:
                wire = reply.cells[s.name][model]
                per_item = {m: [total / max(w, 1e-300)] for m, (total, w) in wire.sums.items()}
                weights = {m: [w] for m, (_, w) in wire.sums.items()}
                if per_question and wire.per_item and wire.weights:
                    per_item |= dict(wire.per_item)
                    weights |= dict(wire.weights)
                cells[(model, name)] = EvalCell(
                    metrics={k: Interval(**v.model_dump()) for k, v in wire.metrics.items()},
                    corpus=dict(wire.corpus),
                    timing=Timing(0.0, 0.0),
                    cached={},
                    reference_length=0.0,
                    per_item=per_item,
                    weights=weights,
                    ids=[],
                    answers=None,
                )
    note = "per-question losses" if per_question else "one pooled value per set and metric, weight Σ w"
    return Evaluation(
        models=tuple(ModelRef(m, "", "", "") for m in models),
        datasets=tuple(datasets),
        cells=cells,
        comparisons=(),
        examples={},
        settings={"per_question": per_question, "per_item": note, "source": "site-reported numbers"},
        manifest={},
        cache=CacheStats(None, 0, 0),
    )


def statistics_of(
    evaluation: Any,
    validation_loss: dict[str, float],
    methods: list[str],
    experts: list[str],
    seed: int,
    paired: bool,
) -> Any:
    """medmerge run's verdict numbers (an evaluate.verdict.Verdict) from the pooled site reports: the
    merge method and the expert with the lowest validation loss; per domain and metric the
    question-pooled means; with per-question losses (`paired`) the paired bootstrap tests of the loss,
    merge − expert and against the expert best in hindsight (other metrics: means only, as sites never
    send them per question). No multi-task model exists in a federation: no gap closed."""
    from medmerge.evaluate import verdict as single

    sets_of = {d: [s.name for s in evaluation.datasets if s.domain == d] for d in single.DOMAINS}
    present = [d for d, sets in sets_of.items() if sets]
    metrics = [metric for metric, _ in single.columns(evaluation)]
    merge = min(methods, key=lambda m: validation_loss[m])
    expert = min(experts, key=lambda e: validation_loss[e])

    def mean(model: str, domain: str, metric: str) -> float | None:
        if not sets_of[domain]:
            return None
        return single.mean(*single.pooled(evaluation, model, sets_of[domain], metric))

    def test(a: str, b: str, domain: str, metric: str) -> Any:
        tested = paired and metric == "loss"
        return single.compare(evaluation, a, b, sets_of[domain], metric, seed) if tested else None

    table = tuple(
        single.VerdictRow(
            m, validation_loss.get(m), {(d, k): mean(m, d, k) for d in sets_of for k in metrics}
        )
        for m in evaluation.model_names
    )
    comparisons = {d: {k: test(merge, expert, d, k) for k in metrics} for d in present} if paired else {}
    hindsight = {}
    for domain in present:
        oracle = min(experts, key=lambda e: mean(e, domain, "loss"))
        if oracle != expert:
            hindsight[domain] = single.Hindsight(oracle, test(merge, oracle, domain, "loss"))
    return single.Verdict(merge, expert, table, comparisons, hindsight)


def leave_one_out_row(config: FederatedConfig, record: dict[str, Any], results: dict[str, Any]) -> dict:
    """One held-out site's row: the merge of the others (method with the lowest validation loss on the
    others' sites) against the best other expert (chosen likewise) and the base, on the held-out site's
    test split; every number is that site's."""
    from medmerge.evaluate.stats import paired_bootstrap

    held, others, searches = record["held_out"], record["experts"], record["searches"]
    main, reply = results[held], record["reply"]
    alive = [s for s in others if s in results and results[s].validation]
    kind, cap = config.federation.objective, config.federation.weight_cap
    choice = {e: objective(_validation(results, alive, e), kind, cap) for e in others}
    method = min(searches, key=lambda m: searches[m]["loss"])
    expert = min(others, key=lambda e: choice[e])
    merge_loss, expert_loss = site_loss(reply, method), site_loss(main, expert)
    test: dict[str, Any] = {"diff": merge_loss - expert_loss}
    if config.federation.per_question:
        (a, wa), (b, wb) = _loss_vectors(reply, method), _loss_vectors(main, expert)
        test = paired_bootstrap(a, b, weights_a=wa, weights_b=wb, seed=config.search.seed).as_dict()
    return {
        "held_out": held,
        "experts": others,
        "method": method,
        "recipe": searches[method]["recipe"],
        "validation_loss": searches[method]["loss"],
        "merge_test_loss": merge_loss,
        "best_other_expert": expert,
        "best_other_expert_test_loss": expert_loss,
        "base_test_loss": site_loss(main, "base"),
        "own_expert_test_loss": site_loss(main, held),
        "merge_minus_best_other_expert": test,
        "methods": {
            m: {"validation_loss": best["loss"], "test_loss": site_loss(reply, m)}
            for m, best in searches.items()
        },
        "weights_sha256": reply.merges.get(method),
        "weights_match_coordinator": reply.merges.get(method) == record["digests"][method],
    }


def _validation(results: dict[str, Any], sites: list[str], model: str) -> dict[str, dict[str, Any]]:
    """{site: {nll_sum, tokens}} of `model` as `sites` reported it in the evaluation."""
    return {s: results[s].validation[model].model_dump() for s in sites}


def _federated_rows(statistics: Any, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The statistics table's rows, with the pooled in-domain test loss and each expert site's own."""
    sites = [s for s in results if any(x.domain == IN for x in results[s].sets)]
    return [
        {
            **row.to_json(),
            "test_loss": row.value(IN, "loss"),
            "test_loss_per_site": {s: site_loss(results[s], row.model) for s in sites},
        }
        for row in statistics.table
    ]


def write_verdict(
    config: FederatedConfig,
    out: Path,
    names: list[str],
    searches: dict,
    results: dict,
    exchange: Any,
    manifests: dict,
    fedavg: dict | None = None,
    leave_one_out: list[dict] | None = None,
    digests: dict[str, str] | None = None,
) -> Path:
    from medmerge.evaluate.verdict import summary_lines, table_markdown

    per_question, cap = config.federation.per_question, config.federation.weight_cap
    models = ["base", *names, *searches, *(["fedavg"] if fedavg else [])]
    evaluation = evaluation_of(results, models, per_question)
    write_json_atomic(out / "evaluation.json", evaluation.to_json())

    def validation(model: str) -> float:
        scorers = [s for s, r in results.items() if r.validation]
        return objective(_validation(results, scorers, model), config.federation.objective, cap)

    losses = {m: searches[m]["loss"] if m in searches else validation(m) for m in models}
    statistics = statistics_of(evaluation, losses, list(searches), names, config.search.seed, per_question)
    merge, expert = statistics.chosen_merge, statistics.best_expert
    rows = {row["model"]: row for row in _federated_rows(statistics, results)}
    comparison: dict[str, Any] = {"diff": rows[merge]["test_loss"] - rows[expert]["test_loss"]}
    if per_question:
        comparison = statistics.comparisons[IN]["loss"].as_dict()
    if fedavg:
        fedavg = {
            **fedavg,
            "test_loss_minus_chosen_merge": rows["fedavg"]["test_loss"] - rows[merge]["test_loss"],
        }
    verdict = {
        "fedavg": fedavg,
        "chosen_merge": merge,
        "best_expert": expert,
        "objective": config.federation.objective,
        "table": list(rows.values()),
        "merge_minus_best_expert_test_loss": comparison,
        "statistics": statistics.to_json(),
        "out_of_domain_sets": [d.name for d in evaluation.datasets if d.domain == OUT],
        "leave_one_site_out": leave_one_out,
        "merges_sha256": {
            m: {
                "coordinator": d,
                "sites_agree": [s for s, r in results.items() if r.merges.get(m) == d],
            }
            for m, d in (digests or {}).items()
        },
        "sites": names,
        "evaluators": list(exchange.evaluators),
        "dropped_sites": dict(exchange.dropped),
        "dropped": dict(exchange.drops),
        "bytes": {"sent_to_site": dict(exchange.sent), "received_from_site": dict(exchange.received)},
        # per approach: one_shot = train + adapter exchange + search; fedavg = its rounds; evaluation;
        # leave_one_out = its searches and evaluations
        "bytes_by_approach": exchange.phases,
        # bytes of each site's shared statistics (federation.share_statistics), counted in one_shot: once
        # from the site, then to every other party
        "shared_statistics_bytes": dict(exchange.shared_statistics),
        "dp_epsilon": {s: m.get("dp_epsilon") for s, m in manifests.items()},
        "contributions_screened": contributions_screened(out),
        "privacy": privacy_per_site(config, results),
        "statistics_seen": statistics_seen_line(config, out),
    }
    write_json_atomic(
        out / "verdict.json", build_manifest("federated-verdict", inputs={}, config=config, verdict=verdict)
    )
    lines = ["# medmerge federate — verdict", "", *summary_lines(statistics)]
    lines.append(
        f"Validation losses are federated (objective `{config.federation.objective}` over the expert "
        f"sites' reports). In-domain test loss, merge − best expert: {comparison['diff']:+.4f} nats/token"
        + ("." if per_question else " (sites sent no per-question values: no interval or test).")
    )
    lines += _dropped_lines(exchange, names)
    lines += _screened_lines(verdict["contributions_screened"])
    lines += ["", verdict["statistics_seen"]]  # what the coordinator saw of the sites' statistics
    lines += ["", table_markdown(statistics)]
    if leave_one_out:
        lines += ["", *_leave_one_out_lines(leave_one_out)]
    if fedavg:
        lines += [
            "",
            f"FedAvg of LoRA ({len(fedavg['rounds'])} rounds × {fedavg['local_steps']} local steps, exact "
            "average of the updates): test loss − chosen merge "
            f"{fedavg['test_loss_minus_chosen_merge']:+.4f}.",
        ]
    lines += privacy_lines(verdict["privacy"])
    lines += ["", "Bytes sent to / received from each site:", ""]
    for phase, counts in exchange.phases.items():
        pairs = (
            f"{s}: {counts['sent_to_site'].get(s, 0)} / {counts['received_from_site'].get(s, 0)}"
            for s in exchange.sites
        )
        lines.append(f"- {phase}: " + ", ".join(pairs))
    if exchange.shared_statistics:
        sizes = ", ".join(f"{s}: {n}" for s, n in exchange.shared_statistics.items())
        lines.append(f"- of which site statistics (one_shot; each also sent to every other party): {sizes}")
    lines.append("")
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out / "report.md")
    return out / "verdict.json"


def statistics_seen_line(config: FederatedConfig, out: Path) -> str:
    """One line: what the coordinator saw of the sites' statistics (federation.statistics.mode)."""
    settings, searched = config.federation.statistics, json.loads((out / "methods.json").read_text())
    if settings.mode == "plain":
        if searched.get("statistics"):
            return (
                "Site statistics: the coordinator saw each site's plain statistics "
                f"({', '.join(searched['statistics'])}; every peer did too)."
            )
        return "Site statistics: none were shared (no data-aware merge)."
    rounds = [r for p in sorted((out / "secure").glob("*.json")) for r in json.loads(p.read_text())["rounds"]]
    sites = sorted({len(r["survivors"]) for r in rounds if r["purpose"] == "sum"})
    noise = f" carrying Gaussian noise (σ = {settings.sigma:g})" if settings.mode == "secure+dp" else ""
    if not sites:
        return f"Site statistics ({settings.mode}): no secure sum was made."
    counts = " or ".join(map(str, sites))
    caveat = (
        ""
        if noise
        else " (but RegMean's sums with the adapters it holds give each site's Grams back: only "
        "secure+dp bounds that, docs/site-statistics.md#the-attack-benchgram_inversionpy)"
    )
    return (
        f"Site statistics ({settings.mode}): the coordinator saw only sums over {counts} sites{noise}, "
        f"no single site's statistics{caveat}."
    )


def _dropped_lines(exchange: Any, names: list[str]) -> list[str]:
    if not exchange.drops:
        return []
    rest = [s for s in exchange.sites if s not in exchange.dropped]
    lines = [f"Sites dropped (the study finished with the rest: {', '.join(rest)}):"]
    for site, drop in exchange.drops.items():
        kept = " Its adapter, received before, stays in the merges." if site in names else ""
        lines.append(
            f"- {site}: at `{drop['step']}` ({drop['at']}, {drop['after_s']:.0f} s into the study), "
            f"{drop['reason']}; none of its numbers from that step on are used.{kept}"
        )
    return lines


def _leave_one_out_lines(rows: list[dict]) -> list[str]:
    lines = [
        "Leave-one-site-out: each held-out site scores, on its own test split, the merge searched over "
        "the other sites (their adapters, their validation), the best other expert and the base.",
        "",
        "| held-out site | merge of the others | merge ↓ | best other expert | expert ↓ | base ↓ "
        "| own expert ↓ | merge − expert |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['held_out']} | skipped: {r['skipped']} | | | | | | |")
            continue
        test = r["merge_minus_best_other_expert"]
        ci = f" [{test['low']:+.4f}, {test['high']:+.4f}]" if "low" in test else ""
        lines.append(
            f"| {r['held_out']} | {r['method']} | {r['merge_test_loss']:.4f} | {r['best_other_expert']} "
            f"| {r['best_other_expert_test_loss']:.4f} | {r['base_test_loss']:.4f} "
            f"| {r['own_expert_test_loss']:.4f} | {test['diff']:+.4f}{ci} |"
        )
    return lines


# ----------------------------------------------------------------- contributions screened (robust)
def contributions_screened(out: Path) -> dict[str, Any]:
    """What the coordinator's screen (federated.screening) did to each site's contribution, from
    out/screened.json: {"refused": {site: why}, "bounded": {site: how its update was scaled back or
    clipped}} of the experts' adapters and statistics (`train`) and of each FedAvg round (`fedavg`:
    {round: …}); empty when nothing was screened."""
    import json

    path = out / "screened.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return {"train": record.get("train", {}), "fedavg": record.get("fedavg", {})}


def _screened_lines(screened: dict[str, Any]) -> list[str]:
    """The report's "Contributions screened" section: one line per refused or bounded site and step."""
    steps = [("train", screened.get("train") or {})]
    steps += [(f"FedAvg {r}", rec) for r, rec in (screened.get("fedavg") or {}).items()]
    items = [
        f"- {site}, at {step}: {verb} — {why}"
        for step, record in steps
        for verb, key in (("refused", "refused"), ("kept, bounded", "bounded"))
        for site, why in (record.get(key) or {}).items()
    ]
    if not items:
        return ["", "Contributions screened: every adapter passed the coordinator's checks unchanged."]
    head = (
        "Contributions screened (federated.screening: adapters checked against the study's LoRA, norm "
        "and direction screens, Gram scales; before anything was merged or forwarded):"
    )
    return ["", head, "", *items]


# ------------------------------------------------------------------------------- privacy per site (dp)
def privacy_per_site(config: FederatedConfig, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each DP site's composed ε, recomputed here from the accountant histories it reported
    (medmerge.train.ledger.spent_epsilon over all its releases, at the study's `privacy.delta` where set,
    else the site's δ), beside the ε the site claimed (`matches_site`: they agree to 1e-6), with its
    releases listed. Sites without a DP release (or evaluate-only nodes) do not appear."""
    from medmerge.train.ledger import spent_epsilon

    study_delta = config.train.privacy.delta if config.train.privacy is not None else None
    out = {}
    for site, reply in results.items():
        ledger = getattr(reply, "privacy", None)
        if ledger is None:
            continue
        delta = study_delta or ledger.delta
        history = [(s, q, int(n)) for r in ledger.releases for s, q, n in r.history]
        epsilon = spent_epsilon(history, delta, ledger.accountant)
        at_site = spent_epsilon(history, ledger.delta, ledger.accountant)
        out[site] = {
            "epsilon": epsilon,
            "delta": delta,
            "site_epsilon": ledger.epsilon,
            "matches_site": math.isclose(at_site, ledger.epsilon, rel_tol=1e-6, abs_tol=1e-9),
            "budget": ledger.budget,
            "unit": ledger.unit,
            "unit_words": ledger.unit_words,
            "accountant": ledger.accountant,
            "releases": [r.model_dump(mode="json") for r in ledger.releases],
        }
    return out


def privacy_lines(privacy: dict[str, dict[str, Any]]) -> list[str]:
    """The report's "Privacy per site" section: composed ε at δ, then each release."""
    if not privacy:
        return []
    lines = [
        "",
        "Privacy per site (each site's privacy ledger: every DP release it made, composed by the "
        "accountant from the histories it reported; docs/privacy.md):",
        "",
    ]
    for site, p in privacy.items():
        budget = f" of budget {p['budget']:g}" if p["budget"] is not None else ""
        check = "" if p["matches_site"] else f" (the site claimed {p['site_epsilon']:.3g}: does not match)"
        unit = f"one {p['unit']}" + (f" ({p['unit_words']})" if p["unit_words"] else "")
        lines.append(
            f"- {site}: ε = {p['epsilon']:.3g}{budget} at δ = {p['delta']:.2g}, per {unit}, "
            f"{p['accountant']} accountant, {len(p['releases'])} releases{check}"
        )
        for r in p["releases"]:
            steps = sum(int(n) for _, _, n in r["history"])
            sigma_q = ", ".join(f"σ {s:.3g} q {q:.3g} × {int(n)}" for s, q, n in r["history"])
            lines.append(
                f"  - {r['what']} ({r['kind']}): ε alone {r['epsilon']:.3g}, {steps} steps ({sigma_q})"
            )
    return lines
