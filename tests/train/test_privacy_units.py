"""The unit of privacy: groups of pairs (MedQuAD's focus, a `group` column) sampled, clipped and counted
as one; δ in that unit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmerge.config import TrainConfig
from medmerge.data import QAPair, load_dataset
from medmerge.errors import MedmergeError
from medmerge.models import load_tokenizer
from medmerge.train import train_expert
from medmerge.train.dp import privacy_units, unit_words
from medmerge.train.examples import prepare_data
from medmerge.train.model import build_model
from medmerge.train.precision import Runtime
from medmerge.train.privacy import PrivateTrainer, read_privacy
from tests.train.helpers import tiny_config

CPU = torch.device("cpu")
GROUPS, PER_GROUP = 12, 3


@pytest.fixture(scope="module")
def grouped_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 pairs in 12 groups of 3 (a `group` column: one patient's questions)."""
    path = tmp_path_factory.mktemp("grouped") / "patients.jsonl"
    topics = ["diabetes", "asthma", "influenza", "anemia", "gout", "eczema"]
    with open(path, "w") as f:
        for g in range(GROUPS):
            for k in range(PER_GROUP):
                topic = topics[(g + k) % len(topics)]
                question = f"Patient {g} asks about {topic} ({k})?"
                row = {"question": question, "answer": f"{topic} is treatable.", "group": f"patient-{g}"}
                f.write(json.dumps(row) + "\n")
    return path


def _config(model: Path, data: Path, privacy: dict | None = None, **overrides) -> TrainConfig:
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **(privacy or {})}
    fractions = {"data": {"specs": [f"jsonl:{data}"], "fractions": [0.75, 0.25, 0.0]}}
    return tiny_config(model, data, privacy=settings, autocast="off", **{**fractions, **overrides})


def _trainer(config: TrainConfig) -> PrivateTrainer:
    torch.manual_seed(config.seed)
    model, kind, path = build_model(config, CPU)
    tokenizer = load_tokenizer(path)
    data = prepare_data(config, tokenizer, kind)
    return PrivateTrainer(config, model, kind, data.train, data.validation, tokenizer.pad_token_id,
                          Runtime(0, 1, CPU), False, groups=data.train_groups)  # fmt: skip


def _params(trainer: PrivateTrainer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}


def _clipped_sum(trainer: PrivateTrainer, units: list[int]) -> dict[str, torch.Tensor]:
    """Σ_{u ∈ units} clip_C(g_u) as the DP step computes it (noise off, no update applied)."""
    seen: dict[str, torch.Tensor] = {}

    def capture(*args, **kwargs):  # the inner optimizer's step: record the gradient, apply nothing
        seen.update(
            {n: p.grad.detach().clone() * trainer.config.batch_size for n, p in _params(trainer).items()}
        )

    trainer.optimizer.step = capture
    trainer.stream = iter([list(units)])
    trainer.step()
    return seen


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())))


def _one_at_a_time(trainer: PrivateTrainer, index: int) -> dict[str, torch.Tensor]:
    from medmerge.data import pad_batch
    from medmerge.train.privacy import example_losses

    trainer.dp_optimizer.zero_grad(set_to_none=True)
    losses, _ = example_losses(trainer.model, pad_batch([trainer.train[index]], trainer.pad_id))
    losses.sum().backward()
    out = {n: p.grad.detach().clone() for n, p in _params(trainer).items()}
    trainer.dp_optimizer.zero_grad(set_to_none=True)
    return out


def test_one_group_moves_the_clipped_sum_by_at_most_C(tiny_llama, grouped_jsonl) -> None:
    """Sensitivity, on real per-example gradients of the tiny model: with unit group, the clipped sum
    over a batch of groups equals Σ_u clip_C(Σ_{i∈u} g_i) (a group spanning two physical chunks is
    clipped once), and removing one group moves it by at most C. With unit pair, removing the same
    group's pairs moves it by more than C: that is what group privacy costs without groups."""
    clip = 0.02
    trainer = _trainer(_config(tiny_llama, grouped_jsonl, {"max_grad_norm": clip, "unit": "group"},
                               batch_size=2))  # fmt: skip
    assert trainer.units.kind == "group" and all(len(m) >= 2 for m in trainer.units.members)
    with torch.no_grad():
        for name, p in _params(trainer).items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer.dp_optimizer.noise_multiplier = 0.0
    units = [0, 1, 2, 3]  # 4 groups of ≥ 2 pairs in chunks of 2 pairs: some group spans two chunks
    full = _clipped_sum(trainer, units)
    per_pair = {i: _one_at_a_time(trainer, i) for u in units for i in trainer.units.members[u]}
    expected = {n: torch.zeros_like(t) for n, t in full.items()}
    for u in units:
        g = {n: sum(per_pair[i][n] for i in trainer.units.members[u]) for n in full}
        norm = _norm(g)
        assert norm > clip  # every group is clipped: the bound is active
        for n in full:
            expected[n] += g[n] * min(1.0, clip / (norm + 1e-6))
    for name in full:
        torch.testing.assert_close(full[name], expected[name], atol=1e-7, rtol=1e-4, msg=name)
    for removed in units:
        without = _clipped_sum(trainer, [u for u in units if u != removed])
        change = _norm({n: full[n] - without[n] for n in full})
        assert change <= clip * (1 + 1e-4)
        assert change > 0.5 * clip  # the group's contribution is there (clipped to C), not vanished

    pairs = _trainer(_config(tiny_llama, grouped_jsonl, {"max_grad_norm": clip, "unit": "pair"},
                             batch_size=2))  # fmt: skip
    assert pairs.units.kind == "pair"
    with torch.no_grad():
        for p, q in zip(_params(pairs).values(), _params(trainer).values(), strict=True):
            p.copy_(q)
    pairs.dp_optimizer.noise_multiplier = 0.0
    group = trainer.units.members[units[0]]
    everyone = [i for u in units for i in trainer.units.members[u]]
    change = _norm(
        {
            n: a - b
            for (n, a), b in zip(
                _clipped_sum(pairs, everyone).items(),
                _clipped_sum(pairs, [i for i in everyone if i not in group]).values(),
                strict=True,
            )
        }  # fmt: skip
    )
    assert change > 1.5 * clip  # the group's pairs, each clipped on its own, move the sum by up to k·C


def test_a_group_expert_counts_groups(tiny_llama, grouped_jsonl, tmp_path) -> None:
    config = _config(tiny_llama, grouped_jsonl, max_steps=3, eval_every=0)
    train_expert(config, tmp_path / "g", progress=False)
    record = read_privacy(tmp_path / "g")
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    n_groups = len({p.group for p in _train_pairs(config)})
    assert record.unit == "group" and record.train_units == n_groups < record.train_examples
    assert record.delta == pytest.approx(1 / (10 * n_groups))
    assert record.sample_rate == pytest.approx(config.batch_size / n_groups)
    assert record.unit_words == "one value of the `group` column and all its rows"
    assert manifest["privacy"]["unit_words"] == record.unit_words
    card = tmp_path / "g" / "README.md"
    if card.is_file():
        assert "one value of the `group` column and all its rows" in card.read_text()


def _train_pairs(config: TrainConfig) -> list[QAPair]:
    from medmerge.data import split_pairs

    pairs = load_dataset(config.data.specs[0]).pairs
    return split_pairs(pairs, config.data.fractions, config.data.split_seed).train


def test_delta_at_or_above_one_over_n_is_refused(tiny_llama, grouped_jsonl) -> None:
    with pytest.raises(MedmergeError, match=r"privacy.delta: 0.5 ≥ 1/N") as info:
        _trainer(_config(tiny_llama, grouped_jsonl, {"delta": 0.5}))
    assert "\n" not in str(info.value) and "groups" in str(info.value)
    assert _trainer(_config(tiny_llama, grouped_jsonl, {"delta": 1e-3})).delta == 1e-3


def test_unit_choice(tiny_llama, tiny_qa_jsonl, grouped_jsonl) -> None:
    """auto: group where the loader knows groups, else pair; group without groups is refused."""
    assert _trainer(_config(tiny_llama, grouped_jsonl)).units.kind == "group"
    assert _trainer(_config(tiny_llama, grouped_jsonl, {"unit": "pair"})).units.kind == "pair"
    plain = tiny_config(tiny_llama, tiny_qa_jsonl, privacy={"noise_multiplier": 1.0, "unit": "group"})
    with pytest.raises(MedmergeError, match="privacy.unit: group, but the training data has no groups"):
        privacy_units(plain.privacy, [None] * 5, 5, plain.data.specs)
    settings = plain.privacy.model_copy(update={"unit": "auto"})
    assert privacy_units(settings, [None] * 5, 5, plain.data.specs).kind == "pair"
    mixed = privacy_units(settings, ["a", None, "a", "b"], 4, ["medquad"])
    assert mixed.members == [[0, 2], [1], [3]]
    assert (
        mixed.words
        == "one MedQuAD focus topic and all its questions; a pair without a group is a unit of its own"
    )
    assert unit_words("pair", ["medquad"], False) == "one question–answer pair"


def test_privacy_groups_of_the_loaders(grouped_jsonl, tmp_path) -> None:
    """MedQuAD's focus (else document), a `group` column (or ?group=COL), none elsewhere."""
    assert QAPair("1", "q", "a", "medquad", focus="Gout ", doc_id="x/1").privacy_group() == "focus:gout"
    assert QAPair("1", "q", "a", "medquad", doc_id="x/1").privacy_group() == "doc:medquad/x/1"
    assert QAPair("1", "q", "a", "icliniq").privacy_group() is None
    pairs = load_dataset(f"jsonl:{grouped_jsonl}").pairs
    assert {p.privacy_group() for p in pairs} == {f"group:patient-{g}" for g in range(GROUPS)}
    other = tmp_path / "t.csv"
    other.write_text("question,answer,who\nq1,a1,x\nq2,a2,x\nq3,a3,y\n")
    assert [p.group for p in load_dataset(f"csv:{other}?group=who").pairs] == ["x", "x", "y"]
    with pytest.raises(MedmergeError, match=r"missing column\(s\) \['patient'\]"):
        load_dataset(f"csv:{other}?group=patient")
