"""What the coordinator does. It holds the base model and no dataset SPEC; everything it learns about
the sites' data arrives as numbers from `Exchange.ask`.

    out/experts/<site>/         each site's adapter (checked against the base, re-pointed at it)
    out/search/<method>.json    every federated trial: recipe, per-site Σ nll and tokens, objective
    out/merges/<method>/        the best recipe of each method, merged (medmerge.merge.merge_models)
    out/fedavg/                 the FedAvg baseline: model/ (base + every round's exact average), rounds
    out/verdict.json, report.md the verdict from site-reported numbers; bytes sent per site
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.federated.checks import base_shapes, check_adapter, check_shapes
from medmerge.federated.config import FederatedConfig
from medmerge.federated.site import ADAPTER_FILES, recipe_config, write_adapter
from medmerge.federated.verdict import objective, write_verdict
from medmerge.federated.wire import Payload
from medmerge.manifest import build_manifest, write_json_atomic


@dataclass
class Exchange:
    """Sends one request to every active site and collects their replies (`send`: Flower, or a test
    double); a site that fails or stays silent is dropped, and the study goes on without it."""

    send: Callable[[Payload, list[str]], dict[str, Payload]]
    sites: list[str]
    min_sites: int
    dropped: dict[str, str] = field(default_factory=dict)  # site -> at which step
    sent: dict[str, int] = field(default_factory=dict)  # bytes to each site
    received: dict[str, int] = field(default_factory=dict)  # bytes from each site
    phase: str = "one_shot"  # what the bytes are counted for: one_shot | fedavg | evaluation
    phases: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # phase -> sent/received

    def ask(self, request: Payload, step: str) -> dict[str, Payload]:
        active = [s for s in self.sites if s not in self.dropped]
        replies = self.send(request, active)
        counts = self.phases.setdefault(self.phase, {"sent_to_site": {}, "received_from_site": {}})
        for site in active:
            self.sent[site] = self.sent.get(site, 0) + request.size
            counts["sent_to_site"][site] = counts["sent_to_site"].get(site, 0) + request.size
            reply = replies.get(site)
            if reply is None or reply.kind == "error":
                self.dropped[site] = step
            else:
                self.received[site] = self.received.get(site, 0) + reply.size
                got = counts["received_from_site"]
                got[site] = got.get(site, 0) + reply.size
        alive = [s for s in active if s not in self.dropped]
        if len(alive) < self.min_sites:
            raise MedmergeError(f"federation: only {len(alive)} site(s) left at {step} ({self.dropped})")
        return {s: replies[s] for s in alive}


def _identity(base_model: str) -> tuple[Path, str, dict]:
    """The base model's folder, checksum and weight shapes."""
    import torch  # noqa: F401  (loaded now, used by the merges)

    from medmerge.manifest import checksum
    from medmerge.models import resolve_model

    base = resolve_model(base_model)
    return base, checksum(base), base_shapes(base)


def run_study(config: FederatedConfig, out: Path, exchange: Exchange) -> Path:
    """The whole federated study; returns out/verdict.json."""
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(1) as pool:  # torch loads and the base is hashed while the sites train
        identity = pool.submit(_identity, config.base_model)
        trained = exchange.ask(Payload("train"), "train")
        base, base_sum, shapes = identity.result()
    blobs, manifests = {}, {}
    for site, reply in trained.items():
        check_adapter(site, reply.meta, reply.blobs, base_sum, shapes)
        manifests[site] = reply.meta
        blobs |= {f"{site}/{f}": reply.blobs[f] for f in ADAPTER_FILES}
    order = [s for s in config.sites if s.name in trained]
    names = [s.name for s in order]
    experts = [str(write_adapter(out / "experts" / n, blobs, n, config.base_model)) for n in names]
    write_json_atomic(out / "sites.json", {"order": names, "manifests": manifests})
    exchange.ask(Payload("adapters", {"order": names}, blobs), "exchange")

    searches = {m: _search(config, m, names, exchange, out) for m in _methods(config)}
    merges = {}
    for method, best in searches.items():
        from medmerge.merge import merge_models

        merges[method] = out / "merges" / method
        merge_models(
            recipe_config(best["recipe"], config.base_model, experts),
            merges[method],
            overwrite=True,
            progress=False,
        )

    fedavg = run_fedavg(config, out, exchange, base, shapes) if config.federation.fedavg.rounds else None

    models: dict[str, Any] = {"base": "base"} | {n: n for n in names}
    models |= {method: best["recipe"] for method, best in searches.items()}
    models |= {"fedavg": "fedavg"} if fedavg else {}
    exchange.phase = "evaluation"
    results = exchange.ask(Payload("evaluate", {"models": models}), "evaluate")
    return write_verdict(config, out, names, searches, results, exchange, manifests, fedavg)


def run_fedavg(config: FederatedConfig, out: Path, exchange: Exchange, base: Path, shapes: dict) -> dict:
    """FedAvg of LoRA over the active sites (federated/fedavg.py): each round the sites train on the
    global model; the coordinator averages their updates exactly and everyone adds the average."""
    import shutil

    from medmerge.federated.fedavg import AGGREGATE, aggregate, apply_aggregate

    settings, folder = config.federation.fedavg, out / "fedavg"
    exchange.phase, current, blobs, rounds = "fedavg", base, {}, []
    for number in range(settings.rounds + 1):
        last = number == settings.rounds  # the last request only adds the last average at the sites
        meta = {"round": number, "local_steps": 0 if last else settings.local_steps}
        replies = exchange.ask(Payload("fedavg", meta, blobs), f"fedavg round {number}")
        if last:
            break
        for site, reply in replies.items():
            check_shapes(site, reply.blobs, shapes)
        weights = {s: float(r.meta["pairs"]) for s, r in replies.items()}
        data, info = aggregate({s: r.blobs for s, r in replies.items()}, weights)
        blobs = {AGGREGATE: data}
        current = apply_aggregate(current, data, folder / f"round-{number}")
        if number:
            shutil.rmtree(folder / f"round-{number - 1}")
        rounds.append({"round": number, "weights": weights, **info})
    model = folder / "model"
    if model.exists():
        shutil.rmtree(model)
    current.rename(model)
    record = {"rounds": rounds, "local_steps": settings.local_steps, "model": str(model)}
    write_json_atomic(folder / "fedavg.json", record)
    exchange.phase = "one_shot"
    return record


def _methods(config: FederatedConfig) -> list[str]:
    from medmerge.merge.registry import get_method

    return [m for m in config.methods if not get_method(m).needs_scorer and get_method(m).space is not None]


def _search(config: FederatedConfig, method: str, names: list[str], exchange: Exchange, out: Path) -> dict:
    """Optuna over the method's knobs; each trial's merge is built and scored at every site."""
    import optuna

    from medmerge.merge.registry import get_method
    from medmerge.merge.spaces import knob_names
    from medmerge.pipeline.search import make_sampler

    spec, settings = get_method(method), config.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(settings))
    knobs = knob_names(spec.space, len(names))
    default = {**{f"w{i}": 1.0 for i in range(len(names)) if f"w{i}" in knobs}, **spec.default}
    study.enqueue_trial({k: v for k, v in default.items() if k in knobs})
    trials = []
    for number in range(settings.trials if knobs else 1):
        trial = study.ask()
        setting = spec.space(trial, len(names))
        weights = setting.weights if setting.weights is not None else [1.0] * len(names)
        recipe = {
            "method": method,
            "parameters": setting.parameters,
            "weights": weights,
            "seed": settings.seed,
        }
        replies = exchange.ask(Payload("score", {"recipe": recipe}), f"search {method} trial {number}")
        numbers = {s: {k: r.meta[k] for k in ("nll_sum", "tokens")} for s, r in replies.items()}
        loss = objective(numbers, config.federation.objective)
        study.tell(trial, loss)
        trials.append({"trial": number, "recipe": recipe, "loss": loss, "sites": numbers})
    best = min(trials, key=lambda t: t["loss"])
    record = {"method": method, "objective": config.federation.objective, "best": best, "trials": trials}
    write_json_atomic(out / "search" / f"{method}.json", record)
    return best


def manifest(config: FederatedConfig, **extra: Any) -> dict[str, Any]:
    return build_manifest("federated", inputs={}, config=config, **extra)
