"""The coordinator's screen of what the sites contribute, before anything is merged or forwarded: one
function for the experts' adapters and shared statistics (`screen_contributions`, called by
coordinator._train and by bench/poisoning.py) and one for FedAvg updates (`screen_updates`).

Experts, in this order:
  1. each adapter alone, checks.validate_adapter against the study's LoRA (checks.lora_study): finite
     values, float32/16/bf16, exactly the study's lora_A / lora_B tensors and shapes (no tensor outside
     the LoRA modules), every adapter_config.json field pinned to the study's (patterns compared as
     data, never compiled); and, where statistics are shared, checks.check_statistics with the study's
     bounds (Gram trace against the tokens the site declared, tokens ≤ the study's most);
  2. across sites (≥ 3 sharing statistics): robust.screen_gram_scales, each Gram's trace per declared
     token against the sites' median, within [1/gram_k, gram_k];
  3. across sites: robust.screen_adapters, the norm screen (‖ΔW_m‖_F against the median of the sites',
     an outsized site scaled back to the others' size, an outlier module clipped to the median; with
     refuse_share, refused instead) and then the direction screen (≥ 3 sites: a site whose update points
     against more than half of the others' is refused);
  4. what is kept is re-serialised by checks.canonical_adapter: the study's config (its
     `base_model_name_or_path` the study's base id, only federated.site.ADAPTER_CONFIG_KEYS) and the
     factors as screened. Nothing of a site's own bytes is merged or forwarded.
Each refusal is one line naming the site and the field (the coordinator drops that site with it); each
site whose update was scaled or clipped gets one line too (kept, and named in the verdict).

FedAvg updates: steps 1 and 3's norm screen only (each round's updates are fresh LoRAs of the round's
global model; their directions are not screened), then fedavg.aggregate with the study's options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.federated.checks import (
    CheckedAdapter,
    LoraStudy,
    StatisticsBounds,
    canonical_adapter,
    check_statistics,
    validate_adapter,
)
from medmerge.federated.robust import (
    clip_factors,
    module_norms,
    screen_adapters,
    screen_gram_scales,
    screen_norms,
)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class Screening:
    """What the screen kept and why it refused or bounded each site.

    kept:     {site: {adapter_config.json, adapter_model.safetensors}} canonical, as merged and forwarded
    checked:  {site: CheckedAdapter} of the kept sites, as screened (for FedAvg's aggregate)
    refused:  {site: one line, naming the check and the field}
    bounded:  {site: one line saying how its update was scaled or clipped} (kept sites)
    details:  JSON numbers for the record (direction cosines, rescale factors)"""

    kept: dict[str, dict[str, bytes]] = field(default_factory=dict)
    checked: dict[str, CheckedAdapter] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    bounded: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON of the screen (coordinator's screened.json; the verdict's `contributions_screened`)."""
        return {"refused": self.refused, "bounded": self.bounded, **self.details}


def _lines_by_site(lines: list[str]) -> dict[str, str]:
    """{site: its line} of robust's `site <name>: …` lines."""
    out = {}
    for line in lines:
        site, _, rest = line.removeprefix("site ").partition(": ")
        out[site] = f"{out[site]}; {rest}" if site in out else rest
    return out


def canonical(adapter: CheckedAdapter, study: LoraStudy, base_id: str) -> dict[str, bytes]:
    """The adapter as the coordinator keeps and forwards it (checks.canonical_adapter, its config cut
    to the keys that may cross the wire, base_model_name_or_path = `base_id`)."""
    from medmerge.federated.site import clean_adapter_config

    blobs = canonical_adapter(adapter, study)
    return blobs | {CONFIG: clean_adapter_config(blobs[CONFIG], base_id, strict=False)}


def screen_contributions(
    sent: Mapping[str, Mapping[str, bytes]],
    study: LoraStudy,
    settings: Any,
    base_id: str,
    *,
    statistics: Mapping[str, Mapping[str, bytes]] | None = None,
    shapes: dict | None = None,
    kinds: list[str] | None = None,
    bounds: StatisticsBounds | None = None,
) -> Screening:
    """The experts' screen (module doc) of `sent` {site: its adapter's two files}, with `settings` the
    study's federation.robust; `statistics` {site: its shared statistics files} checked against the
    base weight `shapes`, the `kinds` asked for and the study's `bounds`."""
    result, checked, summaries = Screening(), {}, {}
    for site, blobs in sent.items():
        try:
            checked[site] = validate_adapter(site, blobs[CONFIG], blobs[WEIGHTS], study)
            if kinds:
                stats = (statistics or {}).get(site, {})
                summaries[site] = check_statistics(site, dict(stats), shapes or {}, kinds, bounds)
        except (MedmergeError, ValueError, RuntimeError, KeyError) as exc:  # any bad adapter: refused
            result.refused[site] = _reason(site, exc)
    if len(summaries) >= 3 and "gram" in (kinds or []):
        for site, why in screen_gram_scales(
            {s: v.mean_sq_norm for s, v in summaries.items()}, settings.gram_k
        ).items():
            result.refused[site] = f"shared statistics refused ({why}, outside {settings.gram_k:g}×)"
            checked.pop(site, None)
    for site in result.refused:
        checked.pop(site, None)
    if not checked:
        return result
    screened = screen_adapters(checked, settings.norm_k, settings.refuse_share, settings.direction_threshold)
    for site, why in screened.refused.items():
        by_norm = site in screened.norms.refused
        result.refused[site] = f"adapter refused by the norm screen ({why})" if by_norm else f"adapter {why}"
    lines = _lines_by_site(screened.norms.lines())
    result.bounded = {s: line for s, line in lines.items() if s in screened.adapters}
    result.checked = dict(screened.adapters)
    result.kept = {s: canonical(a, study, base_id) for s, a in screened.adapters.items()}
    result.details = {
        "rescaled": screened.norms.rescaled,
        "cosines": {f"{a}~{b}": round(c, 4) for (a, b), c in screened.cosines.items()},
        "norm_k": settings.norm_k,
        "direction_threshold": settings.direction_threshold,
    }
    return result


def screen_updates(sent: Mapping[str, Mapping[str, bytes]], study: LoraStudy, settings: Any) -> Screening:
    """FedAvg updates: validate_adapter each, then the norm screen (scaled back or clipped; refused with
    refuse_share) across the round's sites. `kept` is left empty: the round's aggregate reads `checked`."""
    result, checked = Screening(), {}
    for site, blobs in sent.items():
        try:
            checked[site] = validate_adapter(site, blobs[CONFIG], blobs[WEIGHTS], study)
        except (MedmergeError, ValueError, RuntimeError, KeyError) as exc:  # any bad adapter: refused
            result.refused[site] = _reason(site, exc)
    if not checked:
        return result
    norms = screen_norms(module_norms(checked), settings.norm_k, settings.refuse_share)
    for site, why in norms.refused.items():
        result.refused[site] = f"update refused by the norm screen ({why})"
    lines = _lines_by_site(norms.lines())
    result.checked = {
        s: clip_factors(a, norms.scales.get(s, {})) for s, a in checked.items() if s not in norms.refused
    }
    result.bounded = {s: line for s, line in lines.items() if s in result.checked}
    result.details = {"rescaled": norms.rescaled, "norm_k": settings.norm_k}
    return result


def _reason(site: str, exc: BaseException) -> str:
    """A check's one-line refusal without its `site <name>: ` head (the drop line names the site); an
    unexpected error reading the bytes is named by its type only."""
    if not isinstance(exc, MedmergeError):
        return f"adapter refused (unreadable: {type(exc).__name__})"
    return (str(exc).splitlines() or [""])[0].removeprefix(f"site {site}: ")[:300]
