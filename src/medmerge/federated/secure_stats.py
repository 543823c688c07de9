"""The coordinator's side of secure statistics (`federation.statistics.mode: secure | secure+dp`): RegMean
searched from secure sums over ≥ 3 sites, never from one site's statistics.

    out/secure/<method>.json       every secure round: purpose, participants, survivors, dropped (and
                                   why), bytes, seconds, the quantization tolerance; the chosen recipe
    out/secure/<method>/merged.safetensors   the chosen merge's tensors (built from sums)

One search (medmerge.merge.search, the coordinator's Optuna storage), two regimes:
- `secure`: one range round (how many sites lie under each power of two, per tensor: the clip), then one
  sum round with every weight 1: S_G = Σ G_i, S_WG = Σ ΔW_i G_i, S_WD = Σ ΔW_i diag(G_i). One sum serves
  every α (medmerge.merge.from_sums.regmean_from_sums), so the search is over α alone. Sums for other
  weights would be refused by the sites (differencing rule) after N − 1 of them.
- `secure+dp`: each trial's weights get their own noised round (w_i applied at the site, then its share
  of N(0, σ²C²w_max²) over the ≥ t survivors), each charged to every site's privacy ledger; the clip of
  every tensor is public: C·w_max·(examples + 6σ).
S_Δ = Σ w_i ΔW_i is not summed: the coordinator holds the adapters. Each trial's merge (the tensors it
changes) goes to the scoring sites (`secure_merge`), which then score the recipe as any other; the
chosen one goes to every site before the evaluation. SecAgg stage messages go to each site by
`exchange.send` (bytes counted as `Exchange.ask` counts them): a site that refuses or fails a round is out
of that round (SecAggCoordinator's dropout handling), not out of the study.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from medmerge.errors import MedmergeError
from medmerge.federated.config import FederatedConfig
from medmerge.federated.protocol import (
    MASKED_VECTOR,
    SECURE_MERGE,
    ErrorReply,
    Request,
    ScoreRequest,
    SecAggMaskedVectorRequest,
    SecAggSetupRequest,
    SecAggShareKeysRequest,
    SecAggUnmaskRequest,
    SecureMergeRequest,
    SecurePrepareRequest,
    WireRecipe,
    decode,
    reply_type,
)
from medmerge.federated.secure_site import (
    RANGE_BINS,
    RANGE_LOW,
    expert_deltas,
    full_state,
    split_name,
    wire_name,
)
from medmerge.federated.wire import ProtocolError
from medmerge.manifest import write_json_atomic

SECURE_METHODS = ("regmean",)
MIN_SITES = 3
CLIP_MAX = 1e12


def mode(config: FederatedConfig) -> str:
    return config.federation.statistics.mode


def is_secure(config: FederatedConfig, method: str) -> bool:
    """Whether `method` is searched from secure sums in this study."""
    return mode(config) != "plain" and method in SECURE_METHODS


def left_out(config: FederatedConfig, method: str) -> str | None:
    """Why a statistics method is not searched in a secure mode (None: it is)."""
    experts = sum(s.role == "expert" for s in config.sites)
    if method not in SECURE_METHODS:
        return f"statistics.mode {mode(config)}: only {', '.join(SECURE_METHODS)} is merged from secure sums"
    if experts < MIN_SITES:
        return f"a secure sum needs at least {MIN_SITES} expert sites, the study has {experts}"
    return None


# ------------------------------------------------------------------------------------------ transport
def _send(exchange: Any, step: str, requests: dict[str, Request], blobs: bool = False) -> dict[str, Any]:
    """Each site's request (all at once: Exchange.send_each), its checked reply; failures only logged."""
    payloads = {}
    for site, request in requests.items():
        if site in exchange.dropped:
            continue
        payloads[site] = request.payload()
        decode(payloads[site], type(request))
    if exchange.on_step is not None:
        exchange.on_step(step, list(payloads))
    counts = exchange.phases.setdefault(exchange.current, {"sent_to_site": {}, "received_from_site": {}})
    answered, replies = exchange.send_each(payloads), {}
    for site, payload in payloads.items():
        for table in (exchange.sent, counts["sent_to_site"]):
            table[site] = table.get(site, 0) + payload.size
        reply = answered.get(site)
        if reply is None:
            continue
        for table in (exchange.received, counts["received_from_site"]):
            table[site] = table.get(site, 0) + reply.size
        try:
            message = decode(reply, reply_type(payload.kind), sender=site)
        except ProtocolError as exc:
            print(f"medmerge federate: {step}: site {site}: bad reply ({exc})", flush=True)
            continue
        if isinstance(message, ErrorReply):
            print(
                f"medmerge federate: {step}: site {site} refused ({message.error}, {message.code})",
                flush=True,
            )
            continue
        replies[site] = message
    exchange.save()
    return replies


class _Round:
    """The transport of one SecAgg+ round (secagg.run_secure_sum's `exchange`): stage records to
    protocol messages and back."""

    def __init__(self, exchange: Any, label: str, round_id: str, spec: dict[str, Any]) -> None:
        self.exchange, self.label, self.round_id, self.spec = exchange, label, round_id, spec

    def __call__(self, requests: dict[str, Any]) -> dict[str, Any]:
        from medmerge.federated import secagg_records as r

        run, first = self.exchange.run, next(iter(requests.values()), None)
        if first is None:
            return {}
        stage = type(first).__name__
        messages: dict[str, Request] = {}
        for site, record in requests.items():
            fields = json.loads(record.model_dump_json())
            if isinstance(record, r.SetupRequest):
                messages[site] = SecAggSetupRequest(run=run, setup=fields, **self.spec)  # type: ignore[arg-type]
            elif isinstance(record, r.ShareKeysRequest):
                messages[site] = SecAggShareKeysRequest(run=run, round_id=self.round_id, **fields)
            elif isinstance(record, r.MaskedVectorRequest):
                messages[site] = SecAggMaskedVectorRequest(run=run, round_id=self.round_id, **fields)
            else:
                messages[site] = SecAggUnmaskRequest(run=run, round_id=self.round_id, **fields)
        replies = _send(self.exchange, f"{self.label}: {stage.removesuffix('Request')}", messages)
        return {site: self._record(message) for site, message in replies.items()}

    def _record(self, message: Any) -> Any:
        from medmerge.federated import secagg_records as r

        kind = message.KIND
        if kind == "secagg_masked_vector":
            return r.MaskedVectorReply(
                vector=message.blobs[MASKED_VECTOR.file], undecryptable=tuple(message.undecryptable)
            )
        fields = message.model_dump_json(exclude={"site"})
        record = {"secagg_setup": r.SetupReply, "secagg_share_keys": r.ShareKeysReply}.get(
            kind, r.UnmaskReply
        )
        return record.model_validate_json(fields)


def secure_sum(
    exchange: Any,
    label: str,
    round_id: str,
    participants: list[str],
    layout: list[Any],
    spec: dict[str, Any],
    *,
    setup_mode: str = "secure",
    noise_multiplier: float | None = None,
    weights: dict[str, float] | None = None,
) -> Any:
    """One SecAgg+ round over `participants` through `exchange`: secagg.SecureSum (its `absent`: who
    left and why). `spec`: the SecAggSetupRequest fields beside the setup (purpose, weights, noise)."""
    from medmerge.federated.secagg import SecAggCoordinator, recommended_setup, run_secure_sum

    setup = recommended_setup(
        round_id, participants, layout, weights=weights, mode=setup_mode, noise_multiplier=noise_multiplier
    )
    transport = _Round(exchange, label, round_id, spec)
    return run_secure_sum(SecAggCoordinator(setup), transport)


# ------------------------------------------------------------------------------------------- the search
def _round_id(run: str, method: str, n: int) -> str:
    return f"{method}-{run[:12]}-{n}"


class SecureRegMean:
    """RegMean from secure sums for one study (module doc); `search` returns the best trial's record."""

    def __init__(self, config: FederatedConfig, method: str, names: list[str], exchange: Any, out: Path):
        self.config, self.method, self.exchange, self.out = config, method, exchange, out
        self.settings = config.federation.statistics
        self.names = [n for n in names if n not in exchange.dropped]
        self.rounds: list[dict[str, Any]] = []
        self.folder = out / "secure"

    def _prepare(self) -> None:
        """Sites compute their statistics (kept there); the model's public aliases; every expert's ΔW."""
        from medmerge.federated.secure_site import base_tensors

        replies = _send(
            self.exchange,
            f"secure statistics ({self.settings.mode})",
            {s: SecurePrepareRequest(run=self.exchange.run, mode=self.settings.mode) for s in self.names},
        )
        structures = {json.dumps(r.aliases, sort_keys=True) for r in replies.values()}
        if len(structures) > 1:
            raise MedmergeError("secure statistics: the sites report different model structures (aliases)")
        self.aliases = dict(next(iter(replies.values())).aliases) if replies else {}
        self.names = [n for n in self.names if n in replies]
        self.deltas = {n: expert_deltas(self.config.base_model, self.out / "experts" / n) for n in self.names}
        changed = sorted(set().union(*(d.keys() for d in self.deltas.values()))) if self.deltas else []
        self.base = base_tensors(self.config.base_model, set(changed))
        self.shapes: dict[str, tuple[int, ...]] = {}
        for weight in changed:
            out_, in_ = self.base[weight].shape
            self.shapes[wire_name("wg", weight)] = self.shapes[wire_name("wd", weight)] = (out_, in_)
            self.shapes[wire_name("gram", self.aliases.get(weight, weight))] = (in_ * (in_ + 1) // 2,)

    def _record(self, purpose: str, result: Any, started: float, participants: list[str]) -> None:
        tolerance = max(result.tolerance.values()) if result.tolerance else 0.0
        self.rounds.append(
            {
                "round": result.round_id,
                "purpose": purpose,
                "participants": participants,
                "survivors": list(result.survivors),
                "dropped": list(result.dropped),
                "absent": dict(result.absent),
                "seconds": round(time.time() - started, 2),
                "max_tolerance": tolerance,
            }
        )
        write_json_atomic(self.folder / f"{self.method}.json", {"method": self.method, "rounds": self.rounds})

    def _clips(
        self, participants: list[str], weights: dict[str, float]
    ) -> tuple[dict[str, float], list[str]]:
        """Per tensor its clip c, and the sites that answered (secure: a range round)."""
        from medmerge.federated.secagg import TensorSpec

        if self.settings.mode == "secure+dp":
            s = self.settings
            bound = s.clip * max(weights.values()) * (s.examples + 6 * s.sigma)
            return {name: min(bound, CLIP_MAX) for name in self.shapes}, participants
        layout = [TensorSpec(name=f"range.{n}", shape=(RANGE_BINS,), clip=1.0) for n in self.shapes]
        spec = {"purpose": "range", "weights": weights}
        round_id = _round_id(self.exchange.run, self.method, len(self.rounds))
        started = time.time()
        result = secure_sum(
            self.exchange, f"secure {self.method} range", round_id, participants, layout, spec
        )
        self._record("range", result, started, participants)
        survivors = len(result.survivors)
        clips = {}
        for name in self.shapes:
            counts = np.rint(result.tensors[f"range.{name}"]).astype(np.int64)
            under = np.nonzero(counts >= survivors)[0]
            clips[name] = min(2.0 ** (int(under[0]) + RANGE_LOW), CLIP_MAX) if under.size else CLIP_MAX
        return clips, sorted(result.survivors)

    def sums(self, weights: dict[str, float]) -> tuple[dict[str, Any], float, list[str]]:
        """One sum round for `weights` (by site): ({kind::weight: Σ}, Σ w, survivors)."""
        import torch

        from medmerge.federated.secagg import TensorSpec

        s, participants = self.settings, sorted(weights)
        clips, participants = self._clips(participants, weights)
        weights = {site: weights[site] for site in participants}
        layout = [TensorSpec(name=n, shape=shape, clip=clips[n]) for n, shape in self.shapes.items()]
        dp = s.mode == "secure+dp"
        spec: dict[str, Any] = {"purpose": "sum", "weights": weights}
        if dp:
            spec |= {"sigma": s.sigma, "clip": s.clip, "noised_sites": None}
        round_id = _round_id(self.exchange.run, self.method, len(self.rounds))
        from medmerge.federated.secagg import recommended_setup

        threshold = recommended_setup(round_id, participants, layout[:1]).threshold
        spec["noised_sites"] = threshold if dp else None
        started = time.time()
        result = secure_sum(
            self.exchange,
            f"secure {self.method} sum",
            round_id,
            participants,
            layout,
            spec,
            setup_mode=s.mode,
            noise_multiplier=s.sigma if dp else None,
            weights=None if dp else weights,
        )
        self._record("sum", result, started, participants)
        sums = {}
        for name, tensor in result.tensors.items():
            kind, weight = split_name(name)
            sums[f"{kind}::{weight}"] = torch.from_numpy(np.asarray(tensor, dtype=np.float64))
        survivors = sorted(result.survivors)
        for weight in {split_name(n)[1] for n in self.shapes if n.startswith("wg.")}:
            zero = torch.zeros(self.base[weight].shape, dtype=torch.float64)
            sums[f"delta::{weight}"] = sum(
                (self.deltas[site].get(weight, zero) * weights[site] for site in survivors), zero.clone()
            )
        return sums, sum(weights[site] for site in survivors), survivors

    def merge(self, sums: dict[str, Any], total: float, alpha: float, w_max: float) -> dict[str, Any]:
        from medmerge.merge.from_sums import regmean_from_sums

        s = self.settings
        noise = s.sigma * s.clip * w_max if s.mode == "secure+dp" else 0.0
        merged = regmean_from_sums(sums, self.base, total, alpha, aliases=self.aliases, noise_std=noise)
        return merged.weights

    def deliver(self, step: str, recipe: Any, merged: dict[str, Any], sites: list[str]) -> None:
        """Send a merge built from sums to `sites` (secure_merge)."""
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in merged.items()})
        wire = WireRecipe.model_validate(recipe.model_dump())
        requests = {
            s: SecureMergeRequest(run=self.exchange.run, recipe=wire).with_blobs({SECURE_MERGE.file: blob})
            for s in sites
        }
        _send(self.exchange, step, requests)

    def search(self, scorers: list[str] | None = None) -> dict[str, Any]:
        from medmerge.federated.verdict import objective
        from medmerge.merge.recipe import Recipe
        from medmerge.merge.search import Scored, search

        exchange, federation = self.exchange, self.config.federation
        self._prepare()
        if len(self.names) < MIN_SITES:
            raise MedmergeError(
                f"secure {self.method}: {len(self.names)} expert sites left, a secure sum needs {MIN_SITES}"
            )
        dp = self.settings.mode == "secure+dp"
        cache: dict[str, Any] = {}
        if not dp:  # one sum for every α: weights fixed at 1
            cache["sums"] = self.sums({n: 1.0 for n in self.names})
        experts = cache["sums"][2] if not dp else self.names
        states: dict[int, dict[str, Any]] = {}

        def score(recipes: list[Recipe], first: int) -> list[Scored]:
            scored = []
            for number, recipe in enumerate(recipes, start=first):
                weights = dict(zip(recipe.experts, recipe.weights, strict=True))
                sums, total, survivors = cache["sums"] if not dp else self.sums(weights)
                if survivors != sorted(recipe.experts):
                    scored.append(Scored(float("inf"), {"secure": f"sites left the sum: {survivors}"}))
                    continue
                merged = self.merge(sums, total, float(recipe.parameters["alpha"]), max(weights.values()))
                states[number] = merged
                step = f"search {self.method} trial {number}"
                sites = [s for s in (scorers or exchange.experts) if s not in exchange.dropped]
                self.deliver(f"{step}: secure merge", recipe, merged, sites)
                wire = WireRecipe.model_validate(recipe.model_dump())
                replies = exchange.ask(ScoreRequest, step, sites, recipe=wire)
                numbers = {s: {"nll_sum": r.nll_sum, "tokens": r.tokens} for s, r in replies.items()}
                if not numbers:
                    raise MedmergeError(f"federation: no site left to score {step}")
                scored.append(
                    Scored(objective(numbers, federation.objective, federation.weight_cap), numbers)
                )
            return scored

        space = None if dp else _alpha_only
        storage = f"sqlite:///{self.out / 'search.db'}"
        result = search(
            self.method,
            experts,
            self.config.search,
            score,
            storage=storage,
            study_name=f"{exchange.run}/secure/{self.method}",
            space=space,
        )
        trials = []
        for t in result.trials:  # as coordinator._search writes them
            entry = {"trial": t.number, "recipe": t.recipe.model_dump(mode="json")}
            trials.append(entry | {"loss": t.record()["loss"], "sites": t.details})
        best = trials[result.best.number]
        merged = states.get(result.best.number)
        if merged is None:  # a resumed search: the best trial's sums are gone; build its merge again
            recipe = result.best.recipe
            weights = dict(zip(recipe.experts, recipe.weights, strict=True))
            sums, total, _ = cache["sums"] if not dp else self.sums(weights)
            merged = self.merge(sums, total, float(recipe.parameters["alpha"]), max(weights.values()))
        self._keep(result.best.recipe, merged)
        everyone = [s for s in exchange.sites if s not in exchange.dropped]
        self.deliver(f"secure {self.method}: the chosen merge", result.best.recipe, merged, everyone)
        record = {"method": self.method, "objective": federation.objective, "best": best, "trials": trials}
        record |= {
            "experts": experts,
            "scored_by": list(dict.fromkeys(s for t in trials for s in t["sites"] or {})),
        }
        write_json_atomic(self.out / "search" / f"{self.method}.json", record)
        return best

    def _keep(self, recipe: Any, merged: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        folder = self.folder / self.method
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".merged.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp))
        tmp.replace(folder / "merged.safetensors")
        summary = {"method": self.method, "rounds": self.rounds, "chosen": recipe.model_dump(mode="json")}
        summary |= {"mode": self.settings.mode, "sites": sorted(self.names)}
        write_json_atomic(self.folder / f"{self.method}.json", summary)


def _alpha_only(trial: Any, n: int) -> Any:
    """RegMean's space from fixed sums: α over RegMeanParams' declared range, every weight 1 (the sums
    were taken at unit weights, so only α is free)."""
    from medmerge.merge import spaces
    from medmerge.merge.params import RegMeanParams

    alpha = next(k for k in spaces.knobs(RegMeanParams) if k.name == "alpha")
    return spaces.Setting({"alpha": trial.suggest_float("alpha", alpha.low, alpha.high)}, [1.0] * n)


def search(
    config: FederatedConfig, method: str, names: list[str], exchange: Any, out: Path
) -> dict[str, Any]:
    """The secure search of `method` (module doc); the best trial's record, as coordinator._search's."""
    return SecureRegMean(config, method, names, exchange, out).search()


def _merged(out: Path, method: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "secure" / method / "merged.safetensors"))


def write_merge(config: FederatedConfig, out: Path, method: str, run: str) -> None:
    """out/merges/<method>/: the base model with the chosen secure merge's tensors."""
    from medmerge.manifest import atomic_dir
    from medmerge.models import load_model, resolve_model

    model = load_model(resolve_model(config.base_model))
    state = full_state(config.base_model, _merged(out, method))
    model.load_state_dict(state, strict=False)
    with atomic_dir(out / "merges" / method, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        from medmerge.models import load_tokenizer

        load_tokenizer(resolve_model(config.base_model)).save_pretrained(tmp)
    write_json_atomic(out / "merges" / f"{method}.json", {"run": run, "secure": True})


def digest(config: FederatedConfig, out: Path, method: str) -> str:
    """SHA-256 of the chosen secure merge's full state (site.state_digest), as the sites compute it."""
    from medmerge.federated.site import state_digest

    return state_digest(full_state(config.base_model, _merged(out, method)))
