"""Clipped (DP) Gram statistics: one unit moves the WHOLE released vector (every module's G, ΔW·G and
ΔW·diag G, weighted and scaled) by at most |w|·C/d; the keyed unit sample; the noised release."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmerge.data import encode_pair
from medmerge.errors import MedmergeError
from medmerge.merge.from_sums import DELTA, SEP, SumLayout, site_contribution
from medmerge.merge.sum_noise import NoiseRelease, noised_contribution, site_noise_std
from medmerge.models import load_model, load_tokenizer
from medmerge.site_stats import SiteStatistics
from medmerge.train import train_expert
from medmerge.train.private_stats import (
    ClipSettings,
    collect_clipped_grams,
    spectral_norms,
    unit_sample,
)
from medmerge.train.statistics import (
    base_weight_names,
    collect_grams,
    compute_statistics,
    expert_deltas,
    input_scales,
    statistic_linears,
)
from tests.train.helpers import tiny_config

TOPICS = ["diabetes", "asthma", "influenza", "anemia", "gout", "measles", "rabies"]


@pytest.fixture(scope="module")
def site_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dp-site") / "site.jsonl"
    with open(path, "w") as f:
        for i in range(42):
            topic = TOPICS[i % len(TOPICS)]
            row = {
                "question": f"What is {topic} ? case {i}",
                "answer": f"{topic} is a disease " * (1 + i % 4),
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def expert(tiny_llama: Path, site_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(tiny_llama, site_jsonl, max_steps=3, eval_every=0, eval_examples=4)
    return train_expert(config, tmp_path_factory.mktemp("dp-expert") / "lora", progress=False)


@pytest.fixture(scope="module")
def setting(expert: Path):
    model = load_model(expert).eval()
    modules = statistic_linears(model, base_weight_names(expert))
    deltas = expert_deltas(expert, modules)
    tokenizer = load_tokenizer(expert)
    examples = [
        encode_pair(f"What is {t} ? {i}", f"{t} is a disease " * (i + 1), tokenizer, "causal", 64, 32)
        for i, t in enumerate(TOPICS)
    ]
    return model, modules, deltas, examples, tokenizer.pad_token_id


def _released(grams, deltas, weight: float, scale: float, scales=None) -> torch.Tensor:
    layout = SumLayout(diagonal=True, scale=scale, input_scales=scales)
    contribution = site_contribution(deltas, weight, grams=grams.sums, aliases=grams.aliases, layout=layout)
    parts = [t.flatten() for k, t in sorted(contribution.tensors.items()) if k.partition(SEP)[0] != DELTA]
    return torch.cat(parts)


def test_a_large_clip_changes_nothing(setting) -> None:
    model, modules, deltas, examples, pad = setting
    spectral = spectral_norms(deltas)
    clipped, scales, norms = collect_clipped_grams(
        model, modules, examples, pad, spectral, ClipSettings(clip=1e12)
    )
    plain = collect_grams(model, modules, examples, pad)
    assert bool((scales == 1).all()) and clipped.aliases == plain.aliases
    for name, total in plain.sums.items():
        assert float((clipped.sums[name] - total).norm() / total.norm()) < 1e-6  # float32 products


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("unit", ["pair", "group"])
def test_one_unit_moves_the_whole_released_vector_by_at_most_w_c_over_d(setting, unit, scaled) -> None:
    model, modules, deltas, examples, pad = setting
    scales = None
    if scaled:  # public input scales D (from other text): the release travels in x / D
        scales = input_scales(collect_grams(model, modules, examples[::-1][:3], pad))
    spectral = spectral_norms(deltas, scales)
    assert max(spectral.values()) > 0  # a trained adapter: the ΔW terms count
    weight, scale = 0.7, 3.0
    if unit == "pair":
        settings, others, unit_examples = ClipSettings(clip=5.0), examples[:-1], examples[-1:]
    else:  # a group of three pairs, at most per_group = 3 read, each clipped at C / 3
        settings = ClipSettings(clip=5.0, unit="group", per_group=3)
        others, unit_examples = examples[:4], examples[4:]
    if scaled:
        settings = ClipSettings(clip=0.05, unit=settings.unit, per_group=settings.per_group)

    def clipped(chosen, setting):
        grams, s, n = collect_clipped_grams(
            model, modules, chosen, pad, spectral, setting, input_scales=scales
        )
        return _released(grams, deltas, weight, scale, scales), s, n

    without, _, _ = clipped(others, settings)
    with_unit, scales_i, norms = clipped(others + unit_examples, settings)
    assert bool((scales_i < 1).all())  # the clip is active for every example
    torch.testing.assert_close(scales_i, settings.example_limit / norms)
    moved = (with_unit - without).norm()
    bound = weight * settings.clip / scale
    assert moved <= bound * (1 + 1e-6)
    assert moved > 0.2 * bound  # and the bound is not vacuous
    # without clipping, the same pair moves it far more: the clip is what bounds it
    unlimited = ClipSettings(clip=1e12)
    assert (clipped(others + unit_examples, unlimited)[0] - clipped(others, unlimited)[0]).norm() > 2 * bound


def test_the_keyed_sample_decides_each_unit_alone() -> None:
    examples = [{"input_ids": [i, i + 1], "labels": [-100, i + 1]} for i in range(400)]
    key = b"k" * 32
    half = ClipSettings(clip=1.0, rate=0.5)
    picked = unit_sample(examples, None, half, key)
    assert 150 < len(picked) < 250
    more = unit_sample([{"input_ids": [9999, 1], "labels": [-100, 1]}, *examples], None, half, key)
    assert [i - 1 for i in more if i > 0] == picked  # adding a unit changes no other unit's inclusion
    assert unit_sample(examples, None, half, b"x" * 32) != picked  # the key decides
    groups = [f"g{i // 10}" for i in range(400)]
    grouped = unit_sample(examples, groups, ClipSettings(clip=1.0, unit="group", per_group=3), key)
    assert len(grouped) == 40 * 3 and len({groups[i] for i in grouped}) == 40
    with pytest.raises(MedmergeError, match="no group"):
        unit_sample(examples, None, ClipSettings(clip=1.0, unit="group"), key)


def test_the_noised_release_is_charged_first_secret_and_of_the_stated_scale() -> None:
    tensors = {
        "gram::a": torch.zeros(20000, dtype=torch.float64),
        "delta::a": torch.ones(3, dtype=torch.float64),
    }
    from medmerge.merge.from_sums import Contribution

    contribution = Contribution(tensors=tensors, weight=0.5)
    charged: list[NoiseRelease] = []
    args = {"sigma": 2.0, "clip": 3.0, "w_max": 0.5, "layout": SumLayout(scale=10.0), "noised_sites": 4}
    a = noised_contribution(contribution, charge=charged.append, **args)
    b = noised_contribution(contribution, charge=charged.append, **args)
    assert [r.sigma for r in charged] == [2.0, 2.0] and charged[0].sample_rate == 1.0
    std = site_noise_std(2.0, 3.0, 0.5, 10.0, 4)
    assert std == pytest.approx(2.0 * 3.0 * 0.5 / (10.0 * 2))
    assert float(a.tensors["gram::a"].std()) == pytest.approx(std, rel=0.05)
    assert not torch.equal(a.tensors["gram::a"], b.tensors["gram::a"])  # fresh secret noise each time
    assert torch.equal(a.tensors["delta::a"], tensors["delta::a"])  # the expert's own weights: no noise

    def refuse(release: NoiseRelease) -> None:
        raise MedmergeError("budget exceeded")

    with pytest.raises(MedmergeError, match="budget"):
        noised_contribution(contribution, charge=refuse, **args)
    with pytest.raises(MedmergeError, match="w_max"):
        noised_contribution(contribution, charge=charged.append, **{**args, "w_max": 0.1})
    with pytest.raises(MedmergeError, match="token count is data"):
        noised_contribution(
            contribution, charge=charged.append, **{**args, "layout": SumLayout(normalise="tokens")}
        )
    assert len(charged) == 2  # nothing refused was charged


def test_compute_statistics_with_privacy_writes_clipped_grams(expert: Path, tmp_path: Path) -> None:
    out = compute_statistics(
        expert,
        kinds=["gram"],
        max_examples=20,
        privacy=ClipSettings(clip=50.0),
        out_dir=tmp_path,
        progress=False,
    )
    with SiteStatistics.open(out) as stats:
        record = stats.info["privacy"]
        assert record["clip"] == 50.0 and record["unit"] == "pair" and 0 < record["rate"] < 1
        assert stats.has("gram") and not stats.has("fisher")
    text = (out / "statistics.json").read_text()
    assert "seed" not in json.loads(text)["privacy"]  # the sample's key is never written
    with pytest.raises(MedmergeError, match="Gram only"):
        compute_statistics(expert, privacy=ClipSettings(clip=1.0), out_dir=tmp_path / "x", progress=False)
