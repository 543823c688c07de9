"""What one dishonest site can do to a merge is bounded and named: a ×1000 adapter is clipped (or
refused) by the norm screen, a sign-flipped one by the direction screen, an expert that makes the other
sites' loss worse than the base by the validation screen; self-reported search numbers are bounded.
Honest inputs pass unchanged."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from medmerge.federated.checks import CheckedAdapter, LoraFactors, lora_study, validate_adapter
from medmerge.federated.robust import (
    K_NORM,
    bounded_objective,
    clip_factors,
    direction_cosines,
    lora_norm,
    module_norms,
    reference,
    refusals,
    screen_adapters,
    screen_directions,
    screen_norms,
    validation_screen,
)
from tests.federated.lora_adapters import FILES, SETTINGS, peft_adapter, scaled

SITES = ("north", "south", "east")


@pytest.fixture(scope="module")
def study(tiny_llama):
    return lora_study(SETTINGS, tiny_llama, "tiny-base")


@pytest.fixture(scope="module")
def sent(tiny_llama, tmp_path_factory):
    """Three honest sites' PEFT adapters: B half shared, half their own (as experts of one study agree
    in part)."""
    return {
        s: peft_adapter(tiny_llama, tmp_path_factory.mktemp(s), seed=i + 1, shared=0.5)
        for i, s in enumerate(SITES)
    }


def checked(study, blobs: dict[str, dict[str, bytes]]) -> dict[str, CheckedAdapter]:
    return {s: validate_adapter(s, *(b[f] for f in FILES), study) for s, b in blobs.items()}


def test_lora_norm_is_the_frobenius_norm_of_the_update():
    g = torch.Generator().manual_seed(0)
    f = LoraFactors(torch.randn(4, 48, generator=g), torch.randn(40, 4, generator=g), 2.0)
    assert lora_norm(f) == pytest.approx(float(torch.linalg.norm(f.delta())), rel=1e-5)


def test_reference_is_the_median_or_with_two_sites_the_other_one():
    assert reference({"a": 1.0, "b": 5.0, "c": 2.0}, "b") == 2.0
    assert reference({"a": 1.0, "b": 5.0, "c": 2.0, "d": 4.0}, "a") == 3.0
    assert (
        reference({"a": 1.0, "b": 1000.0}, "b") == 1.0 and reference({"a": 1.0, "b": 1000.0}, "a") == 1000.0
    )


def test_honest_adapters_pass_every_screen_unchanged(study, sent):
    adapters = checked(study, sent)
    screen = screen_norms(module_norms(adapters))
    assert screen.flags == [] and screen.scales == {} and screen.refused == {} and screen.lines() == []
    cosines = direction_cosines(adapters)
    assert min(cosines.values()) > 0.2 and screen_directions(cosines) == {}


def test_a_x1000_adapter_is_scaled_back_and_named(study, sent):
    """×1000: every module ~1000× the reference (the median of the three sites: an honest norm), so the
    site's median ratio ρ is above K_NORM: its whole ΔW is scaled by 1/ρ, its modules' relative sizes
    kept; nothing is left above K_NORM × the reference; the verdict line names the site."""
    adapters = checked(study, sent | {"east": scaled(sent["east"], 1000.0)})
    norms = module_norms(adapters)
    screen = screen_norms(norms)
    assert set(screen.scales) == {"east"} and set(screen.rescaled) == {"east"}
    assert {f.site for f in screen.flags} == {"east"} and min(f.ratio for f in screen.flags) > 500
    ratios = [
        norms["east"][m] / statistics.median([norms[s][m] for s in ("north", "south")]) for m in study.modules
    ]
    assert screen.rescaled["east"] == pytest.approx(1 / statistics.median(ratios))
    (line,) = screen.lines()
    assert line.startswith(f"site east: ΔW scaled by {screen.rescaled['east']:.3g} (its modules' norms were")
    clipped = clip_factors(adapters["east"], screen.scales["east"])
    honest = checked(study, {"east": sent["east"]})["east"]
    for module, f in clipped.factors.items():
        assert lora_norm(f) <= K_NORM * reference({s: norms[s][module] for s in SITES}, "east")
        if screen.scales["east"][module] == screen.rescaled["east"]:  # scaled with the whole update
            want = honest.factors[module].delta() * (1000 * screen.rescaled["east"])
            assert torch.allclose(f.delta(), want, rtol=1e-4, atol=1e-7)
    refused = screen_norms(norms, refuse_share=0.5)
    assert list(refused.refused) == ["east"] and refused.scales == {}
    assert refused.lines()[0].startswith(
        "site east: refused by the norm screen (‖ΔW‖ above 3× the reference in 14 of 14"
    )


def test_one_outsized_module_is_clipped_to_the_reference(study, sent):
    """A site that sends one module ×1000 and the rest as trained: not rescaled (its median ratio is
    honest), that module alone is clipped to the reference norm."""
    from tests.federated.lora_adapters import edit

    target = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    bad = edit(sent["east"], tensors=lambda t: t | {target: t[target] * 1000})
    adapters = checked(study, sent | {"east": bad})
    screen = screen_norms(module_norms(adapters))
    module = "model.layers.1.mlp.down_proj.weight"
    assert screen.rescaled == {} and list(screen.scales["east"]) == [module]
    ref = reference({s: lora_norm(adapters[s].factors[module]) for s in SITES}, "east")
    assert lora_norm(clip_factors(adapters["east"], screen.scales["east"]).factors[module]) == pytest.approx(
        ref
    )
    assert screen.lines()[0].startswith(
        "site east: ΔW not rescaled; 1 module(s) clipped to the reference norm"
    )


def test_with_two_sites_the_reference_is_the_other_site(study, sent):
    """The median of two norms is their mean, which a ×1000 site drags up to ~500× the honest one: the
    x1000 site would be only 2× it and pass. Against the other site's norm it is caught."""
    two = {"north": sent["north"], "east": scaled(sent["east"], 1000.0)}
    screen = screen_norms(module_norms(checked(study, two)))
    assert set(screen.scales) == {"east"} and not any(f.site == "north" for f in screen.flags)
    assert K_NORM < 500


def test_a_sign_flipped_adapter_has_honest_norms_but_is_refused_by_direction(study, sent):
    adapters = checked(study, sent | {"south": scaled(sent["south"], -1.0)})
    assert screen_norms(module_norms(adapters)).flags == []  # the norms are the honest ones
    cosines = direction_cosines(adapters)
    assert (
        cosines[("north", "east")] > 0.2 and cosines[("north", "south")] < -0.2 > cosines[("south", "east")]
    )
    refused = screen_directions(cosines)
    assert list(refused) == ["south"]
    assert refused["south"].startswith("its ΔW points against 2 of the 2 other sites'")
    two = {s: adapters[s] for s in ("north", "south")}
    assert screen_directions(direction_cosines(two)) == {}  # 2 sites: who flipped cannot be told


def test_direction_cosines_from_the_factors_equal_the_cosines_of_the_updates():
    g = torch.Generator().manual_seed(3)

    def adapter(site):
        modules = {
            m: LoraFactors(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 1.5) for m in "xyz"
        }
        return CheckedAdapter(site, modules)

    adapters = {s: adapter(s) for s in SITES}
    for (first, second), cosine in direction_cosines(adapters).items():
        each = [
            float(
                torch.nn.functional.cosine_similarity(
                    adapters[first].factors[m].delta().flatten(),
                    adapters[second].factors[m].delta().flatten(),
                    dim=0,
                )
            )
            for m in "xyz"
        ]
        assert cosine == pytest.approx(sorted(each)[1], rel=1e-5)


def test_validation_screen_refuses_an_expert_that_makes_the_others_worse_than_base():
    """Each expert alone, scored at the OTHER sites (its own site's numbers are not counted)."""

    def n(loss: float, tokens: int = 100) -> dict[str, float]:
        return {"nll_sum": loss * tokens, "tokens": tokens}

    scored = {
        "north": {"base": n(2.0), "north": n(1.0), "south": n(1.9), "east": n(2.9)},
        "south": {"base": n(3.0), "north": n(2.8), "south": n(2.0), "east": n(3.7)},
        "east": {"base": n(2.5), "north": n(2.55), "south": n(2.45), "east": n(0.1)},
    }
    screen = validation_screen(scored)  # margin 0.5 nats/token: an honest expert may be a little worse
    assert screen["north"] == pytest.approx(-0.075) and screen["south"] == pytest.approx(-0.075)
    assert refusals(screen) == {
        "east": "alone it worsens the other sites' validation loss by +0.8000 nats/token "
        "(median over 2 site(s), margin 0.5)"
    }
    assert list(refusals(validation_screen(scored, margin=0.0))) == ["east"]
    assert refusals(validation_screen(scored, margin=1.0)) == {}


def test_the_objective_bounds_each_sites_numbers():
    """nll/token clipped to [0, ln V + margin]; a site's token weight at most K × the reference."""
    honest = {"a": {"nll_sum": 200.0, "tokens": 100}, "b": {"nll_sum": 300.0, "tokens": 100}}
    plain = bounded_objective(honest, "tokens", vocab_size=300)
    assert plain.value == pytest.approx(2.5) and plain.clipped == {}
    liar = honest | {"c": {"nll_sum": -1e9, "tokens": 10**9}}  # "every recipe is perfect here", weighted 10⁹
    bounded = bounded_objective(liar, "tokens", vocab_size=300)
    assert bounded.value == pytest.approx(
        (2.0 * 100 + 3.0 * 100 + 0.0 * 200) / 400
    )  # weight capped at 2 × 100
    assert bounded.clipped["c"].startswith(
        "nll/token -1 clipped to [0, 10.7]; token weight 1e+09 capped at 200"
    )
    assert bounded_objective(liar, "worst_site", vocab_size=300).value == 3.0  # a liar cannot lower the worst
    loud = honest | {"c": {"nll_sum": 1e12, "tokens": 100}}
    assert bounded_objective(loud, "sites", vocab_size=300).value == pytest.approx(
        (2 + 3 + math.log(300) + 5) / 3
    )
    with pytest.raises(ValueError, match="site c: nll_sum nan"):
        bounded_objective(honest | {"c": {"nll_sum": float("nan"), "tokens": 5}}, "tokens", vocab_size=300)


def test_screen_adapters_is_both_screens_in_the_coordinators_order(study, sent):
    honest = screen_adapters(checked(study, sent))
    assert honest.refused == {} and honest.lines == [] and set(honest.adapters) == set(SITES)
    for site, adapter in honest.adapters.items():  # unchanged
        assert all(
            torch.equal(f.b, checked(study, {site: sent[site]})[site].factors[m].b)
            for m, f in adapter.factors.items()
        )
    both = checked(study, sent | {"east": scaled(sent["east"], 1000.0)})
    clipped = screen_adapters(both)
    assert clipped.refused == {} and clipped.lines[0].startswith("site east: ΔW scaled by")
    assert max(lora_norm(f) for f in clipped.adapters["east"].factors.values()) < 10 * max(
        lora_norm(f) for f in clipped.adapters["north"].factors.values()
    )
    flipped = screen_adapters(checked(study, sent | {"south": scaled(sent["south"], -1.0)}))
    assert list(flipped.refused) == ["south"] and set(flipped.adapters) == {"north", "east"}
    assert flipped.lines == [f"site south: {flipped.refused['south']}"]
    assert flipped.refused["south"].startswith(
        "refused by the direction screen (its ΔW points against 2 of the 2"
    )


def test_screen_contributions_keeps_honest_adapters_as_canonical_bytes(study, sent):
    """The coordinator's screen (federated.screening): honest adapters pass unbounded; what is kept is
    the study's config (base id, only the keys that may cross the wire) and the same factors; a site
    with a foreign config and one ×1000 are refused / scaled back in the same call."""
    import json

    from medmerge.federated.config import RobustSettings
    from medmerge.federated.screening import screen_contributions
    from medmerge.federated.site import ADAPTER_CONFIG_KEYS
    from tests.federated.lora_adapters import edit

    honest = screen_contributions(sent, study, RobustSettings(), "tiny-base")
    assert not honest.refused and not honest.bounded and set(honest.kept) == set(SITES)
    for site, blobs in honest.kept.items():
        config = json.loads(blobs["adapter_config.json"])
        assert config["base_model_name_or_path"] == "tiny-base" and set(config) <= ADAPTER_CONFIG_KEYS
        again = validate_adapter(site, *(blobs[f] for f in FILES), study)
        for module, f in checked(study, {site: sent[site]})[site].factors.items():
            assert torch.equal(again.factors[module].b, f.b) and torch.equal(again.factors[module].a, f.a)

    attacked = sent | {
        "south": scaled(sent["south"], 1000.0),
        "east": edit(sent["east"], {"use_rslora": True}),
    }
    result = screen_contributions(attacked, study, RobustSettings(), "tiny-base")
    assert set(result.refused) == {"east"} and "adapter_config.json use_rslora" in result.refused["east"]
    assert set(result.bounded) == {"south"} and set(result.kept) == {"north", "south"}
    refused = screen_contributions(attacked, study, RobustSettings(refuse_share=0.5), "tiny-base")
    assert set(refused.refused) == {"east", "south"} and "norm screen" in refused.refused["south"]


def test_robust_and_fedavg_options_are_strict():
    from medmerge.config import validate_config
    from medmerge.errors import MedmergeError
    from medmerge.federated.config import FederatedConfig

    sites = [{"name": "a"}, {"name": "b"}]
    config = validate_config(
        {
            "sites": sites,
            "federation": {
                "fedavg": {"rounds": 1, "aggregate": "trimmed_mean", "trim": 0.25, "clip_norm": 1.5},
                "robust": {"norm_k": 5, "refuse_share": 0.5, "gram_k": 8},
            },
        },
        FederatedConfig,
        "study",
    )
    assert config.federation.fedavg.aggregate == "trimmed_mean" and config.federation.robust.norm_k == 5
    for bad in (
        {"fedavg": {"aggregate": "krum"}},
        {"fedavg": {"trim": 0.5}},
        {"fedavg": {"clip_norm": float("nan")}},
        {"robust": {"norm_k": 0.5}},
        {"robust": {"typo": 1}},
    ):
        with pytest.raises(MedmergeError):
            validate_config({"sites": sites, "federation": bad}, FederatedConfig, "study")
