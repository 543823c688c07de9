"""A site's side of secure statistics (`federation.statistics.mode: secure | secure+dp`): the site steps
of the SecAgg+ message kinds (medmerge.federated.protocol), registered with `@site_step`.

    secure_prepare        compute the Gram statistics a sum reads (clipped in secure+dp), kept at the
                          site in out/secure/statistics/ and never sent; reply the model's public aliases
    secagg_setup …        one SecAgg+ round (secagg.SecAggSite: its secrets live in the site's memory,
    secagg_unmask         in `Site._cache`, and never leave it or touch its disk)
    secure_merge          store a merge the coordinator built from sums (out/secure/merges/), which the
                          score and evaluate requests of this run then name by its recipe

What a site adds into a sum (medmerge.merge.from_sums, normalise "none", public scale 1), by tensor:
`gram.<stored>` the upper triangle of G, `wg.<W>` ΔW·G, `wd.<W>` ΔW·diag(G), for every weight W its
expert changes (ΔW = W − W₀, its adapter merged into the base) and the Gram stored for W's input. The
secure sum multiplies by w (mode secure); in secure+dp the site multiplies by w itself, then adds its
share of the noise N(0, s²), s = σ·C·w_max/√n (medmerge.merge.sum_noise), and the round is charged to
its privacy ledger (`charge_sum`, the one call) before its masked vector leaves.

A `range` round (secure mode) sums, per tensor t and exponent bin j, the indicator max|w·x_t| ≤ 2^(j+LOW):
the coordinator learns how many sites lie under each power of two, and takes the smallest one all lie
under as the tensor's clip (no site is clipped; the step is 2^-43 of it).

Refusals come from SecAggSite (fewer than 3 sites, the differencing rule, the budget of sums), from the
site's own config (another mode than the coordinator asks), and from unknown tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medmerge.errors import MedmergeError
from medmerge.federated.protocol import (
    MASKED_VECTOR,
    SECURE_MERGE,
    SecAggMaskedVectorReply,
    SecAggMaskedVectorRequest,
    SecAggSetupReply,
    SecAggSetupRequest,
    SecAggShareKeysReply,
    SecAggShareKeysRequest,
    SecAggUnmaskReply,
    SecAggUnmaskRequest,
    SecureMergeReply,
    SecureMergeRequest,
    SecurePrepareReply,
    SecurePrepareRequest,
    site_step,
)
from medmerge.federated.site import ADAPTER_FILES, RECIPE_SOURCES, STATISTICS_STEP, Site
from medmerge.federated.wire import Refused, shown
from medmerge.manifest import checksum
from medmerge.steps import cached, step_key

RANGE_LOW, RANGE_BINS = -60, 100  # exponent bins 2^-60 … 2^39 (a TensorSpec clip is at most 1e12)
KINDS = ("gram", "wg", "wd")
STATISTICS_DIR, MERGES_DIR = ("secure", "statistics"), ("secure", "merges")
KEEP_MERGES = 3  # merges a site keeps per run (the coordinator sends the chosen one again to evaluate)


# ------------------------------------------------------------------------------------- shared helpers
def wire_name(kind: str, weight: str) -> str:
    """`gram.<stored>`, `wg.<W>`, `wd.<W>` (a TensorName: dot-separated segments)."""
    return f"{kind}.{weight}"


def split_name(name: str) -> tuple[str, str]:
    kind, _, weight = name.partition(".")
    if kind not in KINDS or not weight:
        raise MedmergeError(f"secure sum: tensor {shown(name)} is none of {', '.join(KINDS)}")
    return kind, weight


def base_tensors(base_model: str, names: set[str] | None = None) -> dict[str, Any]:
    """The base model's tensors (all, or `names`) as float32, read from its safetensors files."""
    import torch
    from safetensors import safe_open

    from medmerge.models import resolve_model

    out = {}
    for file in sorted(Path(resolve_model(base_model)).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if names is None or name in names:
                    out[name] = f.get_tensor(name).to(torch.float32)
    return out


def expert_deltas(base_model: str, folder: str | Path) -> dict[str, Any]:
    """ΔW = W − W₀ of every 2-D tensor an expert (its adapter merged into the base) changes."""
    from medmerge.config import MergeConfig, MergeInput
    from medmerge.merge import merged_state

    merge = MergeConfig(
        method="linear", base_model=base_model, models=[MergeInput(path=str(folder), weight=1.0)]
    )
    state = merged_state(merge)
    base = base_tensors(base_model, set(state))
    return {
        name: (tensor.double() - base[name].double())
        for name, tensor in state.items()
        if tensor.dim() == 2 and name in base and not bool((tensor == base[name]).all())
    }


def full_state(base_model: str, merged: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of the base (float32), those of `merged` replaced: the state a recipe's merge has."""
    return base_tensors(base_model) | dict(merged)


def recipe_key(run: str, recipe: Any) -> str:
    """SHA-256 naming a secure merge: the run and the recipe (canonical JSON)."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(f"{run}\n{text}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------ the site
def _own_mode(site: Site, mode: str) -> Any:
    settings = site.config.federation.statistics
    if settings.mode != mode:
        raise Refused(f"site {site.name}: asked for statistics {mode}, its config says {settings.mode}")
    if site.role != "expert" or not (site.out / "expert").is_dir():
        raise Refused(f"site {site.name}: no trained expert (or an evaluate-only node)")
    return settings


def _statistics_folder(site: Site, mode: str) -> Path:
    """out/secure/statistics/: the Gram statistics of the site's expert (clipped in secure+dp), computed
    once per expert and settings; never sent."""
    from medmerge.site_stats import has_statistics
    from medmerge.train.private_stats import ClipSettings
    from medmerge.train.statistics import compute_statistics

    settings = _own_mode(site, mode)
    folder, expert = site.inside(*STATISTICS_DIR), site.out / "expert"
    expert_id = checksum(expert / ADAPTER_FILES[1])  # the expert's weights: a retrained one gets new sums
    key = step_key(expert=expert_id, mode=mode, settings=settings)
    record = site.inside("secure", STATISTICS_STEP)

    def run_statistics() -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        privacy = ClipSettings(clip=settings.clip, unit=settings.unit) if mode == "secure+dp" else None
        site._step(
            "secure statistics",
            compute_statistics,
            expert,
            site.specs,
            kinds=["gram"],
            out_dir=folder,
            overwrite=True,
            progress=False,
            privacy=privacy,
            **settings.arguments(),
        )
        return {}

    if not has_statistics(folder):
        record.unlink(missing_ok=True)
    cached(record.parent, key, "secure statistics", run_statistics, record=record.name)
    return folder


def contribution(site: Site, mode: str, names: list[str]) -> dict[str, np.ndarray]:
    """The site's tensors (float64, unweighted) for the layout `names` (module doc)."""
    import torch

    from medmerge.merge.from_sums import SumLayout, site_contribution
    from medmerge.site_stats import SiteStatistics

    cache = site._cache.setdefault("secure", {})
    folder = _statistics_folder(site, mode)
    stamp = (folder / "statistics.json").stat().st_mtime_ns
    if cache.get("stamp") != stamp:
        cache.clear()
        cache["stamp"] = stamp
        cache["deltas"] = expert_deltas(site.config.base_model, site.out / "expert")
    deltas = cache["deltas"]
    parsed = [split_name(n) for n in names]
    weights = sorted({w for kind, w in parsed if kind != "gram"})
    unknown = [w for w in weights if w not in deltas]
    if unknown:
        raise Refused(f"site {site.name}: its expert does not change {shown(unknown[0])}")
    with SiteStatistics.open(folder) as stats:
        aliases = dict(stats.info.get("aliases") or {})
        stored = sorted({w for kind, w in parsed if kind == "gram"} | {aliases.get(w, w) for w in weights})
        grams = {}
        for name in stored:
            gram = stats.read("gram", name)
            if gram is None:
                raise Refused(f"site {site.name}: no Gram for {shown(name)}")
            grams[name] = gram.to(torch.float64)
    c = site_contribution(
        {w: deltas[w] for w in weights},
        1.0,
        grams=grams,
        aliases=aliases,
        layout=SumLayout(diagonal=True, scale=1.0),
    )
    out = {}
    for name in names:
        kind, weight = split_name(name)
        tensor = c.tensors.get(f"{kind}::{weight}")
        if tensor is None:
            raise Refused(f"site {site.name}: nothing to add for {shown(name)}")
        out[name] = tensor.numpy()
    return out


def _contribute(site: Site, request: SecAggSetupRequest) -> Any:
    """The `contribute(setup)` callable of this round's SecAggSite (called at its masked-vector stage)."""
    from medmerge.federated.secagg import Contribution

    def contribute(setup: Any) -> Any:
        mode, w = setup.mode, request.weights[site.name]
        if request.purpose == "range":
            names = [spec.name.removeprefix("range.") for spec in setup.layout]
            tensors = contribution(site, mode, names)
            return Contribution({f"range.{n}": _range_row(t, w) for n, t in tensors.items()})
        tensors = contribution(site, mode, [spec.name for spec in setup.layout])
        if mode == "secure":
            return Contribution(tensors)
        return Contribution(_noised(site, request, tensors), noise_multiplier=request.sigma)

    return contribute


def _range_row(tensor: np.ndarray, weight: float) -> np.ndarray:
    """1 in every exponent bin j with max |w·x| ≤ 2^(j + RANGE_LOW), else 0 (RANGE_BINS values)."""
    top = float(np.abs(tensor).max()) * weight if tensor.size else 0.0
    exponent = RANGE_LOW if top <= 2.0**RANGE_LOW else math.ceil(math.log2(top))
    return (np.arange(RANGE_BINS) + RANGE_LOW >= exponent).astype(np.float64)


def _noised(site: Site, request: SecAggSetupRequest, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """secure+dp: w·x plus this site's share of the noise (sum_noise.noised_contribution). The ledger
    is charged once per round, by SecAggSite through `charge_sum` (so the callable given here records
    nothing)."""
    import torch

    from medmerge.merge.from_sums import Contribution, SumLayout
    from medmerge.merge.sum_noise import noised_contribution

    if request.sigma is None or request.clip is None or request.noised_sites is None:
        raise Refused(f"site {site.name}: a secure+dp round without sigma, clip and noised_sites")
    settings = site.config.federation.statistics
    if request.clip != settings.clip or request.sigma < settings.sigma:
        raise Refused(
            f"site {site.name}: the round's clip {request.clip} / σ {request.sigma} are not its config's "
            f"({settings.clip} / at least {settings.sigma})"
        )
    w = request.weights[site.name]
    plain = Contribution({f"x::{n}": torch.from_numpy(t) * w for n, t in tensors.items()}, weight=w)
    noised = noised_contribution(
        plain,
        sigma=request.sigma,
        clip=request.clip,
        w_max=max(request.weights.values()),
        layout=SumLayout(scale=1.0),
        noised_sites=request.noised_sites,
        charge=lambda release: None,
        unit=settings.unit,
    )
    return {n.removeprefix("x::"): t.numpy() for n, t in noised.tensors.items()}


def charge_sum(site: Site, release: Any) -> None:
    """The one call into the site's privacy ledger for a secure+dp round (medmerge.train.ledger): a
    Gaussian mechanism of multiplier σ over every unit (sample rate 1), refused over the budget."""
    from medmerge.train.ledger import PrivacyLedger, gaussian_release

    settings, privacy = site.config.federation.statistics, site.config.train.privacy
    delta = settings.delta or (privacy.delta if privacy else None) or 1 / (10 * max(site._pairs(), 1))
    ledger = PrivacyLedger.load(
        site.out,
        budget=privacy.budget if privacy else None,
        delta=delta,
        accountant=privacy.accountant if privacy else None,
    )
    ledger.charge(
        gaussian_release(
            release.noise_multiplier,
            1.0,
            1,
            what=f"statistics gram (secure sum {release.round_id})",
            unit=settings.unit,
        )
    )


def _round(site: Site, round_id: str) -> Any:
    rounds = site._cache.setdefault("secagg", {})
    if round_id not in rounds:
        raise Refused(f"site {site.name}: no secure round {shown(round_id)} in progress")
    return rounds[round_id]


def _handle(site: Site, round_id: str, record: Any) -> Any:
    from medmerge.federated.secagg import SecAggRefused

    secagg = _round(site, round_id)
    try:
        return secagg.handle(record)
    except SecAggRefused as exc:
        site._cache["secagg"].pop(round_id, None)
        raise Refused(str(exc).splitlines()[0]) from None


def _fields(record: Any) -> dict[str, Any]:
    return json.loads(record.model_dump_json())


@site_step(SecurePrepareRequest, SecurePrepareReply)
def secure_prepare(site: Site, request: SecurePrepareRequest) -> SecurePrepareReply:
    """Compute the statistics a secure sum reads (kept here); reply the model's public aliases."""
    from medmerge.site_stats import SiteStatistics

    with SiteStatistics.open(_statistics_folder(site, request.mode)) as stats:
        aliases = dict(stats.info.get("aliases") or {})
    return SecurePrepareReply(site=site.name, aliases=aliases)


@site_step(SecAggSetupRequest, SecAggSetupReply)
def secagg_setup(site: Site, request: SecAggSetupRequest) -> SecAggSetupReply:
    """Join a secure round (SecAggSite: ≥ 3 sites, the differencing rule, the budget of sums)."""
    from pydantic import ValidationError

    from medmerge.federated.secagg import SecAggSite, SetupRequest, SitePolicy

    settings = _own_mode(site, request.setup.mode)
    if site.name not in request.weights:
        raise Refused(f"site {site.name}: the round gives it no weight")
    try:
        setup = SetupRequest.model_validate_json(request.setup.model_dump_json())
    except ValidationError as exc:
        raise Refused(f"site {site.name}: secure setup: {exc.errors()[0]['msg']}") from None
    secagg = SecAggSite(
        site.name,
        site.out,
        _contribute(site, request),
        policy=SitePolicy(max_sums=settings.max_sums),
        charge=(lambda release: charge_sum(site, release)) if setup.mode == "secure+dp" else None,
    )
    site._cache["secagg"] = {setup.round_id: secagg}  # one round at a time: an older one is abandoned
    reply = _handle(site, setup.round_id, setup)
    return SecAggSetupReply(site=site.name, **_fields(reply))


@site_step(SecAggShareKeysRequest, SecAggShareKeysReply)
def secagg_share_keys(site: Site, request: SecAggShareKeysRequest) -> SecAggShareKeysReply:
    from medmerge.federated.secagg_records import ShareKeysRequest

    record = ShareKeysRequest.model_validate_json(request.model_dump_json(include={"public_keys"}))
    reply = _handle(site, request.round_id, record)
    return SecAggShareKeysReply(site=site.name, **_fields(reply))


@site_step(SecAggMaskedVectorRequest, SecAggMaskedVectorReply)
def secagg_masked_vector(site: Site, request: SecAggMaskedVectorRequest) -> SecAggMaskedVectorReply:
    from medmerge.federated.secagg_records import MaskedVectorRequest

    record = MaskedVectorRequest.model_validate_json(request.model_dump_json(include={"tokens"}))
    reply = _handle(site, request.round_id, record)
    message = SecAggMaskedVectorReply(site=site.name, undecryptable=list(reply.undecryptable))
    return message.with_blobs({MASKED_VECTOR.file: reply.vector})


@site_step(SecAggUnmaskRequest, SecAggUnmaskReply)
def secagg_unmask(site: Site, request: SecAggUnmaskRequest) -> SecAggUnmaskReply:
    from medmerge.federated.secagg_records import UnmaskRequest

    record = UnmaskRequest.model_validate_json(request.model_dump_json(include={"survivors", "dropped"}))
    reply = _handle(site, request.round_id, record)
    site._cache["secagg"].pop(request.round_id, None)  # the round is over at this site
    return SecAggUnmaskReply(site=site.name, **_fields(reply))


@site_step(SecureMergeRequest, SecureMergeReply)
def secure_merge(site: Site, request: SecureMergeRequest) -> SecureMergeReply:
    """Store a merge built from secure sums, for its recipe over experts stored in this run: its tensors
    must be base tensors of the base's shapes, finite."""
    import torch
    from safetensors.torch import load, save

    site._experts(request.run, list(request.recipe.experts))  # refused unless exchanged in this run
    try:
        tensors = load(request.blobs[SECURE_MERGE.file])
    except Exception as exc:  # noqa: BLE001 (any parse failure is a bad blob)
        raise Refused(
            f"site {site.name}: {SECURE_MERGE.file} does not parse ({type(exc).__name__})"
        ) from None
    base = base_tensors(site.config.base_model, set(tensors))
    for name, tensor in tensors.items():
        if name not in base or tensor.shape != base[name].shape or tensor.dtype != torch.float32:
            raise Refused(f"site {site.name}: merged tensor {shown(name)} is not a float32 base tensor")
        if not bool(torch.isfinite(tensor).all()):
            raise Refused(f"site {site.name}: merged tensor {shown(name)} is not finite")
    key = recipe_key(request.run, request.recipe)
    folder = site.inside(*MERGES_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp"
    tmp.write_bytes(save(tensors, metadata={"run": request.run}))
    tmp.replace(folder / f"{key}.safetensors")
    for old in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)[:-KEEP_MERGES]:
        old.unlink(missing_ok=True)
    return SecureMergeReply(site=site.name, stored=key)


def stored_merge(site: Site, run: str, recipe: Any) -> dict[str, Any] | None:
    """The full state of a merge the coordinator sent for `recipe` in `run` (secure_merge), or None."""
    from safetensors.torch import load_file

    path = site.out.joinpath(*MERGES_DIR) / f"{recipe_key(run, recipe)}.safetensors"
    if not path.is_file():
        return None
    return full_state(site.config.base_model, load_file(str(path)))


RECIPE_SOURCES.append(stored_merge)
