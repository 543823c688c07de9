"""What the coordinator does. It holds the base model and no dataset SPEC; everything it learns about
the sites' data arrives as numbers from `Exchange.ask`.

    out/experts/<site>/         each site's adapter (checked against the base, re-pointed at it), and
                                its shared statistics with federation.share_statistics (checked too)
    out/methods.json            the methods searched, and those left out with the reason
    out/search/<method>.json    every federated trial: recipe, per-site Σ nll and tokens, objective
    out/merges/<method>/        the best recipe of each method, merged (medmerge.merge.merge_models)
    out/fedavg/                 the FedAvg baseline: model/ (base + every round's exact average), rounds
    out/loso/<site>/search/     leave-one-site-out: the searches over the other sites (leave_one_out)
    out/evaluation.json         the site-reported evaluation, pooled (medmerge-evaluation/1)
    out/verdict.json, report.md the verdict from site-reported numbers; bytes sent per site

Every file and folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.federated.checks import base_shapes, check_adapter, check_shapes, check_statistics
from medmerge.federated.config import FederatedConfig
from medmerge.federated.site import (
    ADAPTER_FILES,
    STATISTICS_FILES,
    recipe_config,
    state_digest,
    store_statistics,
    write_adapter,
)
from medmerge.federated.verdict import objective, write_verdict
from medmerge.federated.wire import Payload
from medmerge.manifest import build_manifest, write_json_atomic


@dataclass
class Exchange:
    """Sends one request to the active sites (all, or those named) and collects their replies (`send`:
    Flower, or a test double); a site that fails or stays silent is dropped, and the study goes on
    without it while at least `min_sites` expert sites remain."""

    send: Callable[[Payload, list[str]], dict[str, Payload]]
    sites: list[str]
    min_sites: int
    evaluators: list[str] = field(default_factory=list)  # evaluate-only nodes
    reply_timeout_s: float | None = None  # how long a silent site was waited for (for the verdict)
    dropped: dict[str, str] = field(default_factory=dict)  # site -> at which step
    drops: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> step, time, reason
    sent: dict[str, int] = field(default_factory=dict)  # bytes to each site
    received: dict[str, int] = field(default_factory=dict)  # bytes from each site
    phase: str = "one_shot"  # what the bytes are counted for: one_shot | fedavg | evaluation | …
    phases: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # phase -> sent/received
    shared_statistics: dict[str, int] = field(default_factory=dict)  # site -> bytes of its statistics
    started: float = field(default_factory=time.time)
    on_step: Callable[[str, list[str]], None] | None = None  # told each step and its sites, before sending

    @property
    def experts(self) -> list[str]:
        """The expert sites still active."""
        return [s for s in self.sites if s not in self.evaluators and s not in self.dropped]

    def ask(self, request: Payload, step: str, to: list[str] | None = None) -> dict[str, Payload]:
        active = [s for s in (self.sites if to is None else to) if s not in self.dropped]
        if self.on_step is not None:
            self.on_step(step, active)
        replies = self.send(request, active) if active else {}
        counts = self.phases.setdefault(self.phase, {"sent_to_site": {}, "received_from_site": {}})
        for site in active:
            self.sent[site] = self.sent.get(site, 0) + request.size
            counts["sent_to_site"][site] = counts["sent_to_site"].get(site, 0) + request.size
            reply = replies.get(site)
            if reply is None or reply.kind == "error":
                self._drop(site, step, reply)
            else:
                self.received[site] = self.received.get(site, 0) + reply.size
                got = counts["received_from_site"]
                got[site] = got.get(site, 0) + reply.size
        if len(self.experts) < self.min_sites:
            raise MedmergeError(
                f"federation: only {len(self.experts)} expert site(s) left at {step} ({self.dropped})"
            )
        return {s: replies[s] for s in active if s not in self.dropped}

    def _drop(self, site: str, step: str, reply: Payload | None) -> None:
        """Record when and why `site` was dropped: no reply in time, or its one-line error's type."""
        now = time.time()
        if reply is None:
            wait = f" within {self.reply_timeout_s:.0f} s" if self.reply_timeout_s else ""
            reason = f"no reply{wait}"
        else:
            reason = f"error ({str(reply.meta.get('error', '')).split(':')[0] or 'unknown'})"
        self.dropped[site] = step
        self.drops[site] = {
            "step": step,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "after_s": round(now - self.started, 1),
            "reason": reason,
        }


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
    methods, left_out = _methods(config)
    for line in left_out_lines(config):
        print(line, flush=True)
    kinds = _statistics_kinds(methods)
    write_json_atomic(out / "methods.json", {"searched": methods, "left_out": left_out, "statistics": kinds})
    exchange.ask(Payload("hello"), "join")
    with ThreadPoolExecutor(1) as pool:  # torch loads and the base is hashed while the sites train
        identity = pool.submit(_identity, config.base_model)
        request = Payload("train", {"statistics": kinds} if kinds else {})
        trained = exchange.ask(request, "train", exchange.experts)
        base, base_sum, shapes = identity.result()
    blobs, manifests = {}, {}
    for site, reply in trained.items():
        check_adapter(site, reply.meta, reply.blobs, base_sum, shapes)
        if kinds:
            check_statistics(site, reply.blobs, shapes, kinds)
        manifests[site] = reply.meta
        blobs |= {f"{site}/{f}": reply.blobs[f] for f in ADAPTER_FILES}
    order = [s for s in config.sites if s.name in trained]
    names = [s.name for s in order]
    experts = {n: str(write_adapter(out / "experts" / n, blobs, n, config.base_model)) for n in names}
    shared = {n: {f"{n}/{f}": trained[n].blobs[f] for f in STATISTICS_FILES} for n in names if kinds}
    for name, files in shared.items():
        store_statistics(out / "experts" / name, files, name)
        exchange.shared_statistics[name] = sum(len(b) for b in files.values())
    write_json_atomic(out / "sites.json", {"order": names, "manifests": manifests})
    exchange.ask(Payload("adapters", {"order": names, "statistics": list(shared)}, blobs), "exchange")
    for name, files in shared.items():  # one message per site's statistics (gRPC: < 2 GiB a message)
        others = [s for s in exchange.sites if s != name]  # the site stores its own as it shared them
        exchange.ask(Payload("statistics", {"peer": name}, files), f"exchange statistics of {name}", others)

    searches = {m: _search(config, m, names, exchange, out / "search") for m in methods}
    for method, best in searches.items():
        from medmerge.merge import merge_models

        merge_models(
            recipe_config(best["recipe"], config.base_model, list(experts.values())),
            out / "merges" / method,
            overwrite=True,
            progress=False,
        )

    fedavg = run_fedavg(config, out, exchange, base, shapes) if config.federation.fedavg.rounds else None

    models: dict[str, Any] = {"base": "base"} | {n: n for n in names}
    models |= {method: best["recipe"] for method, best in searches.items()}
    models |= {"fedavg": "fedavg"} if fedavg else {}
    exchange.phase = "evaluation"
    results = exchange.ask(Payload("evaluate", {"models": models}), "evaluate")
    digests = {m: _digest(config, best["recipe"], experts) for m, best in searches.items()}
    loso = (
        leave_one_out(config, out, names, experts, exchange, results)
        if config.federation.leave_one_out
        else None
    )
    return write_verdict(config, out, names, searches, results, exchange, manifests, fedavg, loso, digests)


def _digest(config: FederatedConfig, recipe: dict[str, Any], experts: dict[str, str]) -> str:
    """SHA-256 of the recipe's merged weights (site.state_digest), as the sites compute it."""
    from medmerge.merge import merged_state

    folders = [experts[n] for n in recipe["experts"]]
    return state_digest(merged_state(recipe_config(recipe, config.base_model, folders)))


def leave_one_out(
    config: FederatedConfig,
    out: Path,
    names: list[str],
    experts: dict[str, str],
    exchange: Exchange,
    results: dict,
) -> list[dict[str, Any]]:
    """Leave-one-site-out: for each expert site, search each method over the other sites' adapters,
    scored on the other sites' validation splits only; the held-out site alone then scores each
    method's best merge on its test split. Rows built by verdict.leave_one_out_row."""
    from medmerge.federated.verdict import leave_one_out_row

    exchange.phase, rows = "leave_one_out", []
    for held in names:
        others = [n for n in names if n != held]
        scorers = [n for n in others if n not in exchange.dropped]
        if held in exchange.dropped or held not in results or not scorers:
            why = f"dropped at {exchange.dropped[held]}" if held in exchange.dropped else "no other site left"
            rows.append({"held_out": held, "skipped": why})
            continue
        folder, label = out / "loso" / held / "search", f"leave-one-out {held}: "
        methods = _methods(config)[0]
        searches = {m: _search(config, m, others, exchange, folder, scorers, label) for m in methods}
        request = {"models": {m: b["recipe"] for m, b in searches.items()}, "validation": False}
        replies = exchange.ask(
            Payload("evaluate", request | {"domains": ["in-domain"]}), f"{label}evaluate", [held]
        )
        if held not in replies:
            rows.append({"held_out": held, "skipped": f"dropped at {exchange.dropped[held]}"})
            continue
        digests = {m: _digest(config, b["recipe"], experts) for m, b in searches.items()}
        record = {"held_out": held, "experts": others, "searches": searches, "reply": replies[held]}
        rows.append(leave_one_out_row(config, record | {"digests": digests}, results))
    exchange.phase = "one_shot"
    return rows


def run_fedavg(config: FederatedConfig, out: Path, exchange: Exchange, base: Path, shapes: dict) -> dict:
    """FedAvg of LoRA over the active sites (federated/fedavg.py): each round the expert sites train on
    the global model; the coordinator averages their updates exactly and everyone (evaluate-only nodes
    too, which evaluate it) adds the average."""
    import shutil

    from medmerge.federated.fedavg import AGGREGATE, aggregate, apply_aggregate

    settings, folder = config.federation.fedavg, out / "fedavg"
    exchange.phase, current, blobs, rounds = "fedavg", base, {}, []
    for number in range(settings.rounds + 1):
        last = number == settings.rounds  # the last request only adds the last average at the sites
        meta = {"round": number, "local_steps": 0 if last else settings.local_steps}
        replies = exchange.ask(Payload("fedavg", meta, blobs), f"fedavg round {number}")
        replies = {s: r for s, r in replies.items() if r.blobs}  # evaluate-only nodes train nothing
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


def _methods(config: FederatedConfig) -> tuple[list[str], dict[str, str]]:
    """The methods the federation searches, and {method: why it is left out} for those that read the
    experts' training data at merge time (never in a federation) or site statistics that the study does
    not share. Methods without a search space or that need a scorer are not federated (silently)."""
    from medmerge.merge.registry import get_method

    methods, left_out = [], {}
    for spec in map(get_method, config.methods):
        if spec.needs_scorer or spec.space is None:
            continue
        if spec.needs_data:
            left_out[spec.name] = (
                "it reads the experts' training data at merge time, and a site's data never leaves it "
                "(a federation cannot build this merge)"
            )
        elif spec.needs_statistics and not config.federation.share_statistics:
            left_out[spec.name] = (
                f"it needs the sites' {' and '.join(sorted(spec.needs_statistics))} statistics, which "
                "a federation shares only with `federation.share_statistics: true` (read what they "
                "reveal first: docs/site-statistics.md, docs/privacy.md)"
            )
        else:
            methods.append(spec.name)
    return methods, left_out


def left_out_lines(config: FederatedConfig) -> list[str]:
    """One printed line per configured method that the federation leaves out, saying why."""
    return [f"medmerge federate: {m} left out: {why}" for m, why in _methods(config)[1].items()]


def _statistics_kinds(methods: list[str]) -> list[str]:
    """The kinds of site statistics the searched `methods` need (gram, fisher), sorted."""
    from medmerge.merge.registry import get_method

    return sorted(set().union(*(get_method(m).needs_statistics for m in methods)))


def _search(
    config: FederatedConfig,
    method: str,
    names: list[str],
    exchange: Exchange,
    folder: Path,
    scorers: list[str] | None = None,
    label: str = "",
) -> dict:
    """Optuna over the method's knobs for a merge of the experts `names`; each trial's merge is built
    and scored at the `scorers` (default: every active expert site); written to folder/<method>.json."""
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
            "experts": names,
        }
        step = f"{label}search {method} trial {number}"
        replies = exchange.ask(Payload("score", {"recipe": recipe}), step, scorers or exchange.experts)
        numbers = {s: {k: r.meta[k] for k in ("nll_sum", "tokens")} for s, r in replies.items()}
        if not numbers:
            raise MedmergeError(f"federation: no site left to score {step}")
        loss = objective(numbers, config.federation.objective)
        study.tell(trial, loss)
        trials.append({"trial": number, "recipe": recipe, "loss": loss, "sites": numbers})
    best = min(trials, key=lambda t: t["loss"])
    record = {"method": method, "objective": config.federation.objective, "best": best, "trials": trials}
    record |= {"experts": names, "scored_by": list(dict.fromkeys(s for t in trials for s in t["sites"]))}
    write_json_atomic(folder / f"{method}.json", record)
    return best


def manifest(config: FederatedConfig, **extra: Any) -> dict[str, Any]:
    return build_manifest("federated", inputs={}, config=config, **extra)
