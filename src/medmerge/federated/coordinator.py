"""What the coordinator does. It holds the base model and no dataset SPEC; everything it learns about
the sites' data arrives as typed replies (medmerge.federated.protocol) through `Exchange.ask`.

    out/run.json                the study's run id (every request carries it)
    out/exchange.json           who was dropped, when and why; bytes per site and approach
    out/experts/<site>/         each site's adapter as screened (federated.screening: checked against
                                the study's LoRA, norm and direction screens, re-serialised with the
                                study's config, re-pointed at the base), and its shared statistics with
                                federation.share_statistics (checked too)
    out/screened.json           the screen: every site refused (why) or whose update was scaled back or
                                clipped (how), for the experts and each FedAvg round
    out/sites.json              the expert order, each site's training manifest; `exchanged` once
                                every party stored the adapters
    out/methods.json            the methods searched, and those left out with the reason
    out/search.db               the searches (Optuna RDB storage, SQLite): what a resume reuses
    out/search/<method>.json    every federated trial: recipe, per-site Σ nll and tokens, objective
    out/merges/<method>/        the best recipe of each method, merged (medmerge.merge.merge_models)
    out/fedavg/                 the FedAvg baseline: rounds.json, model/ (base + every round's average)
    out/loso/<site>/search/     leave-one-site-out: the searches over the other sites (leave_one_out)
    out/evaluation.json         the site-reported evaluation, pooled (medmerge-evaluation/1)
    out/verdict.json, report.md the verdict from site-reported numbers; bytes sent per site

Every file and folder is written under a temporary name and renamed into place. A bad reply (unknown
key, NaN, oversized or unknown blob, wrong kind, a claim to be another site) or one that fails a check
(adapter, statistics, evaluation) drops that site with one printed line naming it and the field; the
study goes on while `min_sites` expert sites remain.

Resume (`run_study(..., resume=True)`): the run id is read back, and every step whose result is on disk
is reused — the trained and exchanged adapters, every finished search trial (Optuna storage, never sent
again), the merges, the FedAvg rounds — so a kill -9 of the coordinator loses at most the request in
flight. Without resume a new run id is drawn, and nothing of an earlier run is reused (sites key their
FedAvg state and stored adapters by run id too).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.federated import secure_stats
from medmerge.federated.checks import StatisticsBounds, base_shapes, lora_study
from medmerge.federated.config import FederatedConfig
from medmerge.federated.protocol import (
    AdaptersRequest,
    ErrorReply,
    EvaluateReply,
    EvaluateRequest,
    FedAvgRequest,
    HelloRequest,
    Request,
    ScoreRequest,
    StatisticsRequest,
    TrainRequest,
    WireRecipe,
    decode,
    reply_type,
)
from medmerge.federated.screening import screen_contributions, screen_updates
from medmerge.federated.site import (
    ADAPTER_FILES,
    STATISTICS_FILES,
    clean_adapter_config,
    state_digest,
    store_statistics,
    write_adapter,
)
from medmerge.federated.verdict import capped, objective, write_verdict
from medmerge.federated.wire import Payload, ProtocolError, shown
from medmerge.manifest import build_manifest, write_json_atomic
from medmerge.merge.recipe import Recipe

RUN_FILE, STATE_FILE, SEARCH_DB, SCREEN_FILE = "run.json", "exchange.json", "search.db", "screened.json"


@dataclass
class Exchange:
    """Sends one typed request to the active sites (all, or those named) and collects their checked
    replies (`send`: Flower, or a test double; its keys are the authenticated senders). A site that
    fails, stays silent or sends a bad reply is dropped, and the study goes on without it while at
    least `min_sites` expert sites remain."""

    send: Callable[[Payload, list[str]], dict[str, Payload]]
    sites: list[str]
    min_sites: int
    evaluators: list[str] = field(default_factory=list)  # evaluate-only nodes
    reply_timeout_s: float | None = None  # how long a silent site was waited for (for the verdict)
    dropped: dict[str, str] = field(default_factory=dict)  # site -> at which step
    drops: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> step, time, reason
    sent: dict[str, int] = field(default_factory=dict)  # bytes to each site
    received: dict[str, int] = field(default_factory=dict)  # bytes from each site
    current: str = "one_shot"  # what the bytes are counted for now (`phase`)
    phases: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # phase -> sent/received
    shared_statistics: dict[str, int] = field(default_factory=dict)  # site -> bytes of its statistics
    started: float = field(default_factory=time.time)
    on_step: Callable[[str, list[str]], None] | None = None  # told each step and its sites, before sending
    run: str = ""  # the study's run id, carried by every request (run_study sets it)
    state_file: Path | None = None  # where drops and byte counts are kept (for a resume)

    @property
    def experts(self) -> list[str]:
        """The expert sites still active."""
        return [s for s in self.sites if s not in self.evaluators and s not in self.dropped]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the bytes of the requests inside the block for approach `name` (one_shot, fedavg,
        evaluation, leave_one_out)."""
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    def ask(
        self,
        kind: type[Request],
        step: str,
        to: list[str] | None = None,
        blobs: dict[str, bytes] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send `kind(run, **fields)` with `blobs` to the active sites of `to` (default: all); returns
        {site: its reply, checked (protocol.decode)} for the sites that answered well."""
        request = kind(run=self.run, **fields).with_blobs(blobs or {})
        payload = request.payload()
        decode(payload, kind)  # what we send obeys the protocol too
        active = [s for s in (self.sites if to is None else to) if s not in self.dropped]
        if self.on_step is not None:
            self.on_step(step, active)
        replies = self.send(payload, active) if active else {}
        counts = self.phases.setdefault(self.current, {"sent_to_site": {}, "received_from_site": {}})
        expected, kept = reply_type(kind.KIND), {}
        for site in active:
            _add(self.sent, site, payload.size)
            _add(counts["sent_to_site"], site, payload.size)
            reply = replies.get(site)
            if reply is None:
                wait = f" within {self.reply_timeout_s:.0f} s" if self.reply_timeout_s else ""
                self.drop(site, step, f"no reply{wait}")
                continue
            _add(self.received, site, reply.size)
            _add(counts["received_from_site"], site, reply.size)
            try:
                message = decode(reply, expected, sender=site)
            except ProtocolError as exc:
                self.drop(site, step, f"bad reply ({exc})")
                continue
            if isinstance(message, ErrorReply):
                self.drop(site, step, f"error ({message.error}, {message.code})")
                continue
            kept[site] = message
        self.save()
        self.enough(step)
        return kept

    def send_each(self, payloads: dict[str, Payload]) -> dict[str, Payload]:
        """Each site its own payload: all at once where the transport can (`send.each`, e.g. FlowerSend),
        else one `send` per distinct payload; {site: its raw reply} for the sites asked that answered."""
        each = getattr(self.send, "each", None)
        if each is not None:
            answered = each(payloads)
            return {site: answered[site] for site in payloads if site in answered}
        groups: dict[bytes, tuple[Payload, list[str]]] = {}
        for site, payload in payloads.items():
            groups.setdefault(payload.to_bytes(), (payload, []))[1].append(site)
        replies = {}
        for payload, sites in groups.values():
            answered = self.send(payload, sites)
            replies |= {site: answered[site] for site in sites if site in answered}
        return replies

    def enough(self, step: str) -> None:
        """MedmergeError unless at least `min_sites` expert sites are active."""
        if len(self.experts) < self.min_sites:
            raise MedmergeError(
                f"federation: only {len(self.experts)} expert site(s) left at {step} ({self.dropped})"
            )

    def drop(self, site: str, step: str, reason: str) -> None:
        """Drop `site` at `step`, saying why in one printed line (and in the verdict)."""
        now = time.time()
        self.dropped[site] = step
        self.drops[site] = {
            "step": step,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "after_s": round(now - self.started, 1),
            "reason": reason,
        }
        print(f"medmerge federate: site {site} dropped at {step}: {reason}", flush=True)

    _KEPT = ("dropped", "drops", "sent", "received", "phases", "shared_statistics")

    def save(self) -> None:
        if self.state_file is not None:
            state = {"run": self.run, "started": self.started} | {k: getattr(self, k) for k in self._KEPT}
            write_json_atomic(self.state_file, state)

    def restore(self) -> None:
        """Take back the drops and byte counts a previous process of this run saved."""
        if self.state_file is not None and self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            if state.get("run") == self.run:
                self.started = float(state.get("started", self.started))
                for key in self._KEPT:
                    setattr(self, key, state[key])


def _add(counts: dict[str, int], site: str, n: int) -> None:
    counts[site] = counts.get(site, 0) + n


def _identity(base_model: str) -> tuple[Path, str, dict]:
    """The base model's folder, checksum and weight shapes."""
    import torch  # noqa: F401  (loaded now, used by the merges)

    from medmerge.manifest import checksum
    from medmerge.models import resolve_model

    base = resolve_model(base_model)
    return base, checksum(base), base_shapes(base)


def run_id(out: Path, resume: bool) -> str:
    """The study's run id: read back from out/run.json with `resume`, else a new one written there."""
    path = out / RUN_FILE
    if resume:
        if not path.is_file():
            raise MedmergeError(f"{out}: nothing to resume (no {RUN_FILE}; run once without resume)")
        return str(json.loads(path.read_text())["run"])
    (out / SEARCH_DB).unlink(missing_ok=True)  # an earlier run's searches are never reused
    run = uuid.uuid4().hex
    write_json_atomic(path, {"run": run, "started": time.time()})
    return run


def run_study(config: FederatedConfig, out: Path, exchange: Exchange, *, resume: bool = False) -> Path:
    """The whole federated study; returns out/verdict.json. With `resume`, continue the run that
    `out` holds (module doc)."""
    out.mkdir(parents=True, exist_ok=True)
    exchange.run, exchange.state_file = run_id(out, resume), out / STATE_FILE
    if resume:
        exchange.restore()
    methods, left_out = _methods(config)
    for line in left_out_lines(config):
        print(line, flush=True)
    kinds = _statistics_kinds(methods) if secure_stats.mode(config) == "plain" else []  # secure: sums only
    write_json_atomic(out / "methods.json", {"searched": methods, "left_out": left_out, "statistics": kinds})
    roles = exchange.ask(HelloRequest, "join")
    for site, hello in roles.items():
        if hello.role != config.site(site).role:
            exchange.drop(
                site, "join", f"says it is an {hello.role} node, the study has it as {config.site(site).role}"
            )
    exchange.enough("join")
    with ThreadPoolExecutor(1) as pool:  # torch loads and the base is hashed while the sites train
        identity = pool.submit(_identity, config.base_model)
        names, manifests = _train(config, out, exchange, kinds, identity.result, resume)
        base, _, shapes = identity.result()
    experts = {n: str(out / "experts" / n) for n in names}
    _exchange(config, out, exchange, names, kinds)

    searches = {m: _search(config, m, names, exchange, out) for m in methods}
    for method, best in searches.items():
        if secure_stats.is_secure(config, method):
            secure_stats.write_merge(config, out, method, exchange.run)
        else:
            _merge(config, out, method, best["recipe"], experts, exchange.run)

    fedavg = run_fedavg(config, out, exchange, base, shapes) if config.federation.fedavg.rounds else None

    models: dict[str, Any] = {"base": "base"} | {n: n for n in names}
    models |= {method: best["recipe"] for method, best in searches.items()}
    models |= {"fedavg": "fedavg"} if fedavg else {}
    with exchange.phase("evaluation"):
        results = _evaluate(exchange, "evaluate", models)
    digests = {
        m: secure_stats.digest(config, out, m)
        if secure_stats.is_secure(config, m)
        else _digest(config, best["recipe"], experts)
        for m, best in searches.items()
    }
    loso = (
        leave_one_out(config, out, names, experts, exchange, results)
        if config.federation.leave_one_out
        else None
    )
    exchange.save()
    return write_verdict(config, out, names, searches, results, exchange, manifests, fedavg, loso, digests)


def _train(
    config: FederatedConfig,
    out: Path,
    exchange: Exchange,
    kinds: list[str],
    identity: Callable[[], tuple[Path, str, dict]],
    resume: bool,
) -> tuple[list[str], dict[str, dict]]:
    """Train at the expert sites, screen their adapters (and statistics: federated.screening, each
    refused site dropped with its line) and keep what passed, as screened, in out/experts/; (expert
    order, manifests). With `resume`, the adapters this run already kept."""
    record = out / "sites.json"
    if resume and record.is_file():
        kept = json.loads(record.read_text())
        if kept.get("run") == exchange.run:
            return [n for n in kept["order"] if n not in exchange.dropped], kept["manifests"]
    trained = exchange.ask(TrainRequest, "train", exchange.experts, statistics=kinds)
    base, base_sum, shapes = identity()
    for site, reply in list(trained.items()):
        if reply.base.checksum != base_sum:
            why = f"adapter refused (trained on another base: {reply.base.checksum[:12]}…)"
            exchange.drop(site, "train", why)
            del trained[site]
    train = config.train
    bounds = StatisticsBounds.for_study(
        config.federation.statistics.examples, train.max_prompt_tokens, train.max_answer_tokens
    )
    screening = screen_contributions(
        {s: r.blobs for s, r in trained.items()},
        lora_study(train.lora, base, config.base_model),
        config.federation.robust,
        config.base_model,
        statistics={s: r.blobs for s, r in trained.items()},
        shapes=shapes,
        kinds=kinds,
        bounds=bounds,
    )
    for site, why in screening.refused.items():
        exchange.drop(site, "train", why)
    for site, how in screening.bounded.items():
        print(f"medmerge federate: site {site} screened at train: {how}", flush=True)
    manifests = {
        s: r.model_dump(mode="json", exclude={"site"}) for s, r in trained.items() if s in screening.kept
    }
    exchange.enough("train")
    write_json_atomic(out / SCREEN_FILE, {"run": exchange.run, "train": screening.record(), "fedavg": {}})
    names = [s.name for s in config.sites if s.name in manifests]
    for name in names:
        blobs = trained[name].blobs
        write_adapter(out / "experts" / name, screening.kept[name], config.base_model)
        if kinds:
            files = {f: blobs[f] for f in STATISTICS_FILES}
            store_statistics(out / "experts" / name, files)
            exchange.shared_statistics[name] = sum(len(b) for b in files.values())
    write_json_atomic(
        record, {"run": exchange.run, "order": names, "manifests": manifests, "exchanged": False}
    )
    return names, manifests


def _exchange(
    config: FederatedConfig, out: Path, exchange: Exchange, names: list[str], kinds: list[str]
) -> None:
    """Every party stores every expert's adapter (and every other site's statistics, one message per
    site); skipped when this run's exchange finished before."""
    record = out / "sites.json"
    kept = json.loads(record.read_text())
    if kept.get("exchanged"):
        return
    blobs = {}
    for name in names:
        folder = out / "experts" / name
        blobs[f"{name}/{ADAPTER_FILES[0]}"] = clean_adapter_config(
            (folder / ADAPTER_FILES[0]).read_bytes(), config.base_model
        )
        blobs[f"{name}/{ADAPTER_FILES[1]}"] = (folder / ADAPTER_FILES[1]).read_bytes()
    shared = names if kinds else []
    exchange.ask(AdaptersRequest, "exchange", blobs=blobs, order=names, statistics=shared)
    for name in shared:  # one message per site's statistics (gRPC: < 2 GiB a message)
        files = {f: (out / "experts" / name / f).read_bytes() for f in STATISTICS_FILES}
        others = [s for s in exchange.sites if s != name]  # the site stores its own as it shared them
        exchange.ask(StatisticsRequest, f"exchange statistics of {name}", others, blobs=files, peer=name)
    write_json_atomic(record, kept | {"exchanged": True})


def _merge(config: FederatedConfig, out: Path, method: str, recipe: dict, experts: dict, run: str) -> None:
    """The method's best recipe merged into out/merges/<method>/ (reused when this run made it)."""
    from medmerge.merge import merge_models

    folder, stamp = out / "merges" / method, out / "merges" / f"{method}.json"
    done = {"run": run, "recipe": recipe}
    if folder.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == done:
        return
    config_ = Recipe.model_validate(recipe).merge_config(config.base_model, experts)
    merge_models(config_, folder, overwrite=True, progress=False)
    write_json_atomic(stamp, done)


def _digest(config: FederatedConfig, recipe: dict[str, Any], experts: dict[str, str]) -> str:
    """SHA-256 of the recipe's merged weights (site.state_digest), as the sites compute it."""
    from medmerge.merge import merged_state

    merge = Recipe.model_validate(recipe).merge_config(config.base_model, experts)
    return state_digest(merged_state(merge))


def _evaluate(
    exchange: Exchange, step: str, models: dict[str, Any], to: list[str] | None = None, **fields: Any
) -> dict[str, EvaluateReply]:
    """The evaluate replies of the sites in `to`, each checked to hold every model on every set (and on
    the validation split where one was asked of an expert site); an incomplete one drops its site."""
    wire = {name: m if isinstance(m, str) else WireRecipe.model_validate(m) for name, m in models.items()}
    replies = exchange.ask(EvaluateRequest, step, to, models=wire, **fields)
    for site, reply in list(replies.items()):
        labels = {s.name for s in reply.sets}
        validation = fields.get("validation", True) and site in exchange.experts
        missing = [m for m in models if validation and m not in reply.validation]
        missing += [f"{label}/{m}" for label in labels for m in models if m not in reply.cells.get(label, {})]
        if set(reply.cells) != labels or missing:
            exchange.drop(site, step, f"bad reply (cells: no {shown(missing[0]) if missing else 'set list'})")
            del replies[site]
    exchange.enough(step)
    return replies


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

    rows = []
    with exchange.phase("leave_one_out"):
        for held in names:
            others = [n for n in names if n != held]
            scorers = [n for n in others if n not in exchange.dropped]
            if held in exchange.dropped or held not in results or not scorers:
                why = (
                    f"dropped at {exchange.dropped[held]}"
                    if held in exchange.dropped
                    else "no other site left"
                )
                rows.append({"held_out": held, "skipped": why})
                continue
            methods = [m for m in _methods(config)[0] if not secure_stats.is_secure(config, m)]  # see docs
            searches = {m: _search(config, m, others, exchange, out, held, scorers) for m in methods}
            models = {m: b["recipe"] for m, b in searches.items()}
            step = f"leave-one-out {held}: evaluate"
            replies = _evaluate(exchange, step, models, [held], validation=False, domains=["in-domain"])
            if held not in replies:
                rows.append({"held_out": held, "skipped": f"dropped at {exchange.dropped[held]}"})
                continue
            digests = {m: _digest(config, b["recipe"], experts) for m, b in searches.items()}
            record = {"held_out": held, "experts": others, "searches": searches, "reply": replies[held]}
            rows.append(leave_one_out_row(config, record | {"digests": digests}, results))
    return rows


def run_fedavg(config: FederatedConfig, out: Path, exchange: Exchange, base: Path, shapes: dict) -> dict:
    """FedAvg of LoRA over the active sites (federated/fedavg.py): each round the expert sites train on
    the global model; the coordinator averages their updates exactly, each site's weight its training
    pairs clipped to weight_cap × their median (verdict.capped), and everyone (evaluate-only nodes too,
    which evaluate it) adds the average. Each round's updates are screened first
    (screening.screen_updates: checked against the study's LoRA, outsized ones scaled back), then
    combined by federation.fedavg's aggregate rule, trim and clip_norm (fedavg.AggregateOptions).
    Each finished round is kept (rounds.json, its aggregate and the global model after it), so a
    resumed run goes on from the last one."""
    from medmerge.federated.fedavg import AGGREGATE, AggregateOptions, aggregate, apply_aggregate

    settings, folder = config.federation.fedavg, out / "fedavg"
    options = AggregateOptions(settings.aggregate, "pairs", clip_norm=settings.clip_norm, trim=settings.trim)
    study = lora_study(config.train.lora, base, config.base_model)
    state_file, model = folder / "rounds.json", folder / "model"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("run") != exchange.run:
        shutil.rmtree(folder, ignore_errors=True)
        state = {"run": exchange.run, "rounds": []}
    rounds: list[dict] = state["rounds"]
    if state.get("done") and model.is_dir():
        return state["record"]
    current, blobs = base, {}
    if rounds:
        last = len(rounds) - 1
        current = model if model.is_dir() else folder / f"round-{last}"
        blobs = {AGGREGATE: (folder / f"aggregate-{last}.safetensors").read_bytes()}
    with exchange.phase("fedavg"):
        for number in range(len(rounds), settings.rounds + 1):
            final = number == settings.rounds  # the last request only adds the last average at the sites
            step = f"fedavg round {number}"
            steps = 0 if final else settings.local_steps
            replies = exchange.ask(FedAvgRequest, step, blobs=blobs, round=number, local_steps=steps)
            if final:
                break
            sent = {}
            for site, reply in replies.items():
                if not reply.blobs:  # evaluate-only nodes train nothing
                    continue
                if set(reply.blobs) != set(ADAPTER_FILES) or reply.pairs is None:
                    why = "update refused (an update is an adapter's two files and its pairs)"
                    exchange.drop(site, step, why)
                    continue
                sent[site] = reply.blobs
            screen = screen_updates(sent, study, config.federation.robust)
            for site, why in screen.refused.items():
                exchange.drop(site, step, why)
            exchange.enough(step)
            updates = screen.checked
            reported = {s: float(replies[s].pairs) for s in updates}
            weights = capped(reported, config.federation.weight_cap)
            data, info = aggregate(updates, weights, options=options)
            _screened(out, f"round {number}", screen.record())
            blobs = {AGGREGATE: data}
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"aggregate-{number}.safetensors").write_bytes(data)
            current = apply_aggregate(current, data, folder / f"round-{number}")
            if number:
                shutil.rmtree(folder / f"round-{number - 1}", ignore_errors=True)
                (folder / f"aggregate-{number - 1}.safetensors").unlink(missing_ok=True)
            info["screened"] = screen.bounded
            rounds.append({"round": number, "weights": weights, "reported_pairs": reported, **info})
            write_json_atomic(state_file, state)
    if current != model:
        shutil.rmtree(model, ignore_errors=True)
        current.rename(model)
    record = {"rounds": rounds, "local_steps": settings.local_steps, "model": str(model)}
    write_json_atomic(folder / "fedavg.json", record)
    write_json_atomic(state_file, state | {"done": True, "record": record})
    return record


def _screened(out: Path, key: str, record: dict[str, Any]) -> None:
    """Add a FedAvg round's screen to out/screened.json (a round's refusals and bounds, for the verdict)."""
    path = out / SCREEN_FILE
    kept = json.loads(path.read_text()) if path.is_file() else {}
    kept.setdefault("fedavg", {})[key] = record
    write_json_atomic(path, kept)


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
        elif spec.needs_statistics and secure_stats.mode(config) != "plain":
            why = secure_stats.left_out(config, spec.name)
            if why:
                left_out[spec.name] = why
            else:
                methods.append(spec.name)
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
    out: Path,
    held: str | None = None,
    scorers: list[str] | None = None,
) -> dict:
    """The method's search (medmerge.merge.search) over the experts `names`; each trial's merge is
    built and scored at the `scorers` (default: every active expert site), its objective from their
    Σ nll and tokens (verdict.objective: a site's non-finite loss fails the trial). Kept in the run's
    Optuna storage (a resume sends no finished trial again) and written to search/<method>.json, or
    with `held` (leave-one-site-out) loso/<held>/search/<method>.json."""
    from medmerge.merge.search import Scored, search

    if held is None and secure_stats.is_secure(config, method):  # the sums, never one site's statistics
        return secure_stats.search(config, method, names, exchange, out)
    settings, federation = config.search, config.federation
    folder = out / "search" if held is None else out / "loso" / held / "search"
    label = "" if held is None else f"leave-one-out {held}: "

    def score(recipes: list[Recipe], first: int) -> list[Scored]:
        scored = []
        for number, recipe in enumerate(recipes, start=first):
            step = f"{label}search {method} trial {number}"
            wire = WireRecipe.model_validate(recipe.model_dump())
            replies = exchange.ask(ScoreRequest, step, scorers or exchange.experts, recipe=wire)
            numbers = {s: {"nll_sum": r.nll_sum, "tokens": r.tokens} for s, r in replies.items()}
            if not numbers:
                raise MedmergeError(f"federation: no site left to score {step}")
            scored.append(Scored(objective(numbers, federation.objective, federation.weight_cap), numbers))
        return scored

    storage, study = f"sqlite:///{out / SEARCH_DB}", f"{exchange.run}/{held or 'all'}/{method}"
    result = search(method, names, settings, score, storage=storage, study_name=study)
    trials = [
        {"trial": t.number, "recipe": t.recipe.model_dump(mode="json"), "loss": t.record()["loss"]}
        | {"sites": t.details}
        for t in result.trials
    ]
    best = trials[result.best.number]
    record = {"method": method, "objective": federation.objective, "best": best, "trials": trials}
    record |= {"experts": names, "scored_by": list(dict.fromkeys(s for t in trials for s in t["sites"]))}
    write_json_atomic(folder / f"{method}.json", record)
    return best


def manifest(config: FederatedConfig, **extra: Any) -> dict[str, Any]:
    return build_manifest("federated", inputs={}, config=config, **extra)


__all__ = ["Exchange", "leave_one_out", "left_out_lines", "run_fedavg", "run_id", "run_study"]
