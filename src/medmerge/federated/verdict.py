"""The federated verdict, from site-reported numbers only: the merge chosen on federated validation
loss against the best single expert (also chosen on validation), on the sites' pooled test answers
(token-weighted, nats/token); a paired bootstrap (medmerge.evaluate.stats) where sites sent
per-question losses; dropped sites and bytes sent per site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medmerge.federated.config import FederatedConfig
from medmerge.manifest import build_manifest, write_json_atomic


def objective(numbers: dict[str, dict[str, Any]], kind: str) -> float:
    """Validation loss of a recipe from the sites' Σ nll and tokens (nats/token)."""
    means = {s: n["nll_sum"] / max(n["tokens"], 1) for s, n in numbers.items()}
    if kind == "tokens":
        return sum(n["nll_sum"] for n in numbers.values()) / max(
            sum(n["tokens"] for n in numbers.values()), 1
        )
    return sum(means.values()) / len(means) if kind == "sites" else max(means.values())


def _pooled(results: dict[str, Any], split: str, model: str) -> float:
    numbers = [r.meta["results"][split][model] for r in results.values()]
    return sum(n["nll_sum"] for n in numbers) / max(sum(n["tokens"] for n in numbers), 1)


def _per_question(results: dict[str, Any], model: str) -> tuple[list[float], list[float]] | None:
    rows = []
    for reply in results.values():
        numbers = reply.meta["results"]["test"][model]
        if "per_question" not in numbers:
            return None
        rows += [(nll / max(tokens, 1), tokens) for nll, tokens in numbers["per_question"]]
    return [r[0] for r in rows], [r[1] for r in rows]


def write_verdict(
    config: FederatedConfig,
    out: Path,
    names: list[str],
    searches: dict,
    results: dict,
    exchange: Any,
    manifests: dict,
    fedavg: dict | None = None,
) -> Path:
    from medmerge.evaluate.stats import paired_bootstrap

    def validation(model: str) -> float:
        numbers = {s: r.meta["results"]["validation"][model] for s, r in results.items()}
        return objective(numbers, config.federation.objective)

    models = ["base", *names, *searches, *(["fedavg"] if fedavg else [])]
    table = [
        {
            "model": m,
            "validation_loss": searches[m]["loss"] if m in searches else validation(m),
            "test_loss": _pooled(results, "test", m),
            "test_loss_per_site": {
                s: r.meta["results"]["test"][m]["nll_sum"] / max(r.meta["results"]["test"][m]["tokens"], 1)
                for s, r in results.items()
            },
        }
        for m in models
    ]
    rows = {row["model"]: row for row in table}
    merge = min(searches, key=lambda m: searches[m]["loss"])
    expert = min(names, key=lambda n: rows[n]["validation_loss"])
    comparison: dict[str, Any] = {"diff": rows[merge]["test_loss"] - rows[expert]["test_loss"]}
    a, b = _per_question(results, merge), _per_question(results, expert)
    if a and b:
        comparison = paired_bootstrap(
            a[0], b[0], weights_a=a[1], weights_b=b[1], seed=config.search.seed
        ).as_dict()
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
        "table": table,
        "merge_minus_best_expert_test_loss": comparison,
        "sites": names,
        "dropped_sites": dict(exchange.dropped),
        "bytes": {"sent_to_site": dict(exchange.sent), "received_from_site": dict(exchange.received)},
        # per approach: one_shot = train + adapter exchange + search; fedavg = its rounds; evaluation
        "bytes_by_approach": exchange.phases,
        "dp_epsilon": {s: m.get("dp_epsilon") for s, m in manifests.items()},
    }
    write_json_atomic(
        out / "verdict.json", build_manifest("federated-verdict", inputs={}, config=config, verdict=verdict)
    )
    lines = [
        "# medmerge federate — verdict",
        "",
        f"Chosen merge (lowest federated validation loss, objective "
        f"`{config.federation.objective}`): {merge}; "
        f"best single expert: {expert}. Test loss, merge − expert: {comparison['diff']:+.4f} nats/token.",
    ]
    if exchange.dropped:
        lines.append(f"Sites dropped (finished with the rest): {exchange.dropped}.")
    lines += ["", "| model | val loss ↓ | test loss ↓ |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['validation_loss']:.4f} | {r['test_loss']:.4f} |" for r in table]
    if fedavg:
        lines += [
            "",
            f"FedAvg of LoRA ({len(fedavg['rounds'])} rounds × {fedavg['local_steps']} local steps, exact "
            "average of the updates): test loss − chosen merge "
            f"{fedavg['test_loss_minus_chosen_merge']:+.4f}.",
        ]
    lines += ["", "Bytes sent to / received from each site:", ""]
    for phase, counts in exchange.phases.items():
        pairs = (
            f"{s}: {counts['sent_to_site'].get(s, 0)} / {counts['received_from_site'].get(s, 0)}"
            for s in exchange.sites
        )
        lines.append(f"- {phase}: " + ", ".join(pairs))
    lines.append("")
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out / "report.md")
    return out / "verdict.json"
