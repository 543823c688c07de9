"""DP experts: per-example gradients, clipping, accounting, end-to-end training, resume and refusals."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmerge.config import TrainConfig
from medmerge.data import pad_batch
from medmerge.errors import MedmergeError
from medmerge.loss import answer_only_head
from medmerge.models import load_tokenizer
from medmerge.train import train_expert
from medmerge.train.examples import prepare_data
from medmerge.train.model import build_model
from medmerge.train.precision import Runtime
from medmerge.train.privacy import (
    PrivateTrainer,
    example_losses,
    read_privacy,
    refuse_unsupported,
    spent_epsilon,
)
from tests.train.helpers import tiny_config

CPU = torch.device("cpu")


def _dp_config(model: Path, data: Path, privacy: dict | None = None, **overrides) -> TrainConfig:
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, **(privacy or {})}
    return tiny_config(model, data, privacy=settings, **{"autocast": "off", **overrides})


def _trainer(config: TrainConfig) -> PrivateTrainer:
    torch.manual_seed(config.seed)
    model, kind, path = build_model(config, CPU)
    tokenizer = load_tokenizer(path)
    data = prepare_data(config, tokenizer, kind)
    return PrivateTrainer(config, model, kind, data.train, data.validation, tokenizer.pad_token_id,
                          Runtime(0, 1, CPU), False)  # fmt: skip


def _lora_params(trainer: PrivateTrainer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}


def _grad_samples(trainer: PrivateTrainer, examples: list) -> dict[str, torch.Tensor]:
    """Per-example gradients (B, *shape) of each LoRA parameter from the DP path (Opacus hooks)."""
    trainer.dp_optimizer.zero_grad(set_to_none=True)
    losses, _ = example_losses(trainer.model, pad_batch(examples, trainer.pad_id))
    losses.sum().backward()
    out = {n: p.grad_sample.detach().clone() for n, p in _lora_params(trainer).items()}
    trainer.dp_optimizer.zero_grad(set_to_none=True)
    return out


def _one_at_a_time(trainer: PrivateTrainer, examples: list) -> list[dict[str, torch.Tensor]]:
    """∇ℓ_i of each example alone, through plain autograd (p.grad)."""
    grads = []
    for example in examples:
        trainer.dp_optimizer.zero_grad(set_to_none=True)
        losses, _ = example_losses(trainer.model, pad_batch([example], trainer.pad_id))
        losses.sum().backward()
        grads.append({n: p.grad.detach().clone() for n, p in _lora_params(trainer).items()})
    trainer.dp_optimizer.zero_grad(set_to_none=True)
    return grads


def _nonzero_lora_b(trainer: PrivateTrainer) -> None:
    """LoRA B starts at 0 (A then gets no gradient): move it so every parameter's gradient is tested."""
    with torch.no_grad():
        for name, p in _lora_params(trainer).items():
            if "lora_B" in name:
                p.normal_(0, 0.05)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5"])
def test_per_example_gradients_equal_one_example_at_a_time(model_fixture, request, tiny_qa_jsonl) -> None:
    model = request.getfixturevalue(model_fixture)
    trainer = _trainer(_dp_config(model, tiny_qa_jsonl))
    if model_fixture == "tiny_llama":  # the fused answer-head cross-entropy is on this path
        assert answer_only_head(trainer.model) is not None
    for module in trainer.model.modules():  # T5's own dropout (rate 0.1) would draw other masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # T5Attention's functional dropout
            module.dropout = 0.0
    _nonzero_lora_b(trainer)
    examples = trainer.train[:5]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # padding differs between examples
    batched = _grad_samples(trainer, examples)
    alone = _one_at_a_time(trainer, examples)
    for name, samples in batched.items():
        assert samples.shape[0] == len(examples), name
        for i, grads in enumerate(alone):
            torch.testing.assert_close(samples[i], grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_counter_dropout_keeps_per_example_gradients_exact(tiny_llama, tiny_qa_jsonl) -> None:
    """With counter-based dropout: Σ_i per-example grads = the batch gradient, and an example's grad
    does not depend on the other examples' data (same masks, other neighbour)."""
    trainer = _trainer(_dp_config(tiny_llama, tiny_qa_jsonl, lora={"dropout": 0.2}, dropout_rng="counter"))
    assert "rng=counter" in repr(trainer.model)
    _nonzero_lora_b(trainer)
    a, b = trainer.train[0], trainer.train[1]
    c = {k: list(v) for k, v in b.items()}
    c["input_ids"] = [
        (t + 7) % 250 + 10 if lab == -100 else t for t, lab in zip(c["input_ids"], c["labels"], strict=True)
    ]
    torch.manual_seed(3)
    trainer.dp_optimizer.zero_grad(set_to_none=True)
    losses, _ = example_losses(trainer.model, pad_batch([a, b], trainer.pad_id))
    losses.sum().backward()
    params = _lora_params(trainer)
    with_b = {n: p.grad_sample.detach().clone() for n, p in params.items()}
    for name, p in params.items():
        torch.testing.assert_close(with_b[name].sum(0), p.grad, atol=1e-6, rtol=1e-4, msg=name)
    torch.manual_seed(3)
    with_c = _grad_samples(trainer, [a, c])
    assert any(not torch.equal(with_b[n][1], with_c[n][1]) for n in params)  # the neighbour changed
    for name in params:
        torch.testing.assert_close(with_b[name][0], with_c[name][0], atol=1e-6, rtol=1e-4, msg=name)


def test_clipping_bounds_each_example_and_keeps_them_all(tiny_llama, tiny_qa_jsonl) -> None:
    """A sampled batch of 10 (> batch_size 4: three physical chunks), noise off: the update is exactly
    Σ_i g_i · min(1, C/‖g_i‖) / batch_size, each clipped norm ≤ C, and no example is left out."""
    clip = 0.05
    trainer = _trainer(_dp_config(tiny_llama, tiny_qa_jsonl, {"max_grad_norm": clip}))
    _nonzero_lora_b(trainer)
    trainer.dp_optimizer.noise_multiplier = 0.0
    sampled = list(range(10))
    trainer.stream = iter([sampled])
    alone = _one_at_a_time(trainer, [trainer.train[i] for i in sampled])
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads.values())) for grads in alone])
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (norms > clip).all()  # every example is clipped here
    assert (norms * factors <= clip * (1 + 1e-5)).all()
    expected = {
        n: sum(f * grads[n] for f, grads in zip(factors, alone, strict=True)) / trainer.config.batch_size
        for n in alone[0]
    }
    seen: dict[str, torch.Tensor] = {}
    original_step = trainer.optimizer.step

    def capture(*args, **kwargs):
        seen.update({n: p.grad.detach().clone() for n, p in _lora_params(trainer).items()})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.step()
    for name, value in expected.items():
        torch.testing.assert_close(seen[name], value, atol=1e-7, rtol=1e-4, msg=name)
    assert trainer.accountant.history == [(0.0, trainer.sample_rate, 1)]  # one (noise-free) step accounted


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(accountant) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    q, sigma, steps, delta = 0.01, 1.1, 300, 1e-5
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    assert spent_epsilon([(sigma, q, steps)], delta, accountant) == reference.get_epsilon(delta=delta)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5"])
def test_a_dp_expert_trains_within_its_budget(model_fixture, request, tiny_qa_jsonl, tmp_path) -> None:
    model = request.getfixturevalue(model_fixture)
    # bf16 autocast where the CPU has it (bf16 per-example grads, clipped in float32)
    config = _dp_config(
        model, tiny_qa_jsonl, {"target_epsilon": 1.0, "noise_multiplier": None}, autocast="auto"
    )
    out = tmp_path / "dp"
    train_expert(config, out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    record = read_privacy(out)
    assert record is not None and record.to_json() == manifest["privacy"]
    n = manifest["metrics"]["train_examples"]
    # no group column: the unit is the pair, N = n, and δ defaults to 1/(10·N)
    assert (
        record.unit == "pair" and record.train_units == n and record.unit_words == "one question–answer pair"
    )
    assert record.epsilon <= 1.0 and record.steps == 24 and record.delta == pytest.approx(1 / (10 * n))
    assert record.sample_rate == pytest.approx(4 / n) and record.accountant == "prv"
    assert record.epsilon == spent_epsilon(
        [(record.noise_multiplier, record.sample_rate, 24)], record.delta, "prv"
    )
    history = [(record.noise_multiplier, record.sample_rate, 24)]
    assert record.epsilon_at == {f"{d:g}": spent_epsilon(history, d, "prv") for d in (1e-5, 1e-6)}
    assert manifest["metrics"]["train_loss_last"] is None  # the raw train loss is not published
    assert manifest["metrics"]["val_loss_final"] < float("inf")
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    card = out / "README.md"
    if card.is_file():
        text = card.read_text()
        assert "Differential privacy" in text and "one question–answer pair" in text
        assert "at δ = 1e-05" in text and "at δ = 1e-06" in text and "os.urandom" in text


def test_nothing_exact_beside_a_dp_expert(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    """The curve has no token counts or per-step times, the manifest no raw file SHA-256 and no exact
    token count; a non-DP expert keeps all of them."""
    dp, plain = tmp_path / "dp", tmp_path / "plain"
    train_expert(_dp_config(tiny_llama, tiny_qa_jsonl, max_steps=4, eval_every=2), dp, progress=False)
    train_expert(tiny_config(tiny_llama, tiny_qa_jsonl, max_steps=4, eval_every=2), plain, progress=False)
    rows = {f: list(csv.DictReader(open(f / "curve.csv"))) for f in (dp, plain)}
    assert all(r["tokens"] == "" and r["elapsed_s"] == "" and r["train_loss"] == "" for r in rows[dp])
    assert all(r["tokens"] != "" for r in rows[plain])
    manifests = {f: json.loads((f / "manifest.json").read_text()) for f in (dp, plain)}
    (source,) = manifests[dp]["inputs"]["data"]
    assert "sha256" not in source and source["train_fingerprint"] and source["origin_fingerprint"]
    assert "sha256" in manifests[plain]["inputs"]["data"][0]
    assert manifests[dp]["metrics"]["tokens"] is None and manifests[plain]["metrics"]["tokens"] > 0
    rate = manifests[dp]["metrics"]["tokens_per_s"]
    assert float(f"{rate:.2g}") == rate


def test_a_non_private_expert_records_no_privacy(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    train_expert(
        tiny_config(tiny_llama, tiny_qa_jsonl, max_steps=2, eval_every=0), tmp_path / "e", progress=False
    )
    assert read_privacy(tmp_path / "e") is None


def test_resume_restores_the_accountant(tiny_llama, tiny_qa_jsonl, tmp_path) -> None:
    """A resumed DP run ends at the same history and ε as an uninterrupted one; its weights are not
    bit-identical (fresh secret randomness after the resume), but it trained on from the checkpoint."""
    config = _dp_config(tiny_llama, tiny_qa_jsonl, {"accountant": "rdp"}, max_steps=8, eval_every=4,
                        checkpoint_every=3, lora={"dropout": 0.1})  # fmt: skip
    whole = tmp_path / "whole"
    train_expert(config, whole, progress=False)

    def ctrl_c(trainer, step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    parted = tmp_path / "parted"
    with pytest.raises(KeyboardInterrupt):
        train_expert(config, parted, progress=False, hooks=[ctrl_c])
    train_expert(config, parted, resume=True, progress=False)
    a, b = read_privacy(whole), read_privacy(parted)
    assert a is not None and b is not None
    assert a.steps == b.steps == 8 and a.history == b.history
    assert b.epsilon == a.epsilon > 0
    manifest = json.loads((parted / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 8


REFUSED = [
    ({"method": "full"}, "method full"),
    ({"method": "qlora"}, "method qlora"),
    ({"lora": {"use_dora": True}}, "use_dora"),
    ({"grad_accum": 2}, "grad_accum must be 1"),
    ({"group_by_length": True}, "group_by_length"),
    ({"lora": {"target_modules": ["q_proj", "lm_head"]}}, "lm_head"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_unsupported_settings_are_refused_before_training(
    overrides, message, tiny_llama, tiny_qa_jsonl, tmp_path
) -> None:
    config = _dp_config(tiny_llama, tiny_qa_jsonl, **overrides)
    steps: list[int] = []
    with pytest.raises(MedmergeError, match=message) as info:
        train_expert(config, tmp_path / "x", progress=False, hooks=[lambda t, s: steps.append(s)])
    assert "\n" not in str(info.value) and str(info.value).startswith("privacy:")
    assert steps == [] and not (tmp_path / "x").exists()


def test_refusals_without_training(tiny_llama, tiny_qa_jsonl) -> None:
    config = _dp_config(tiny_llama, tiny_qa_jsonl)
    with pytest.raises(MedmergeError, match="multi-process"):
        refuse_unsupported(config, world=2)
    refuse_unsupported(config, world=1)  # the default group_by_length is simply replaced, not refused


def test_privacy_settings_need_exactly_one_of_epsilon_and_noise(tiny_llama, tiny_qa_jsonl) -> None:
    with pytest.raises(MedmergeError, match="exactly one"):
        _dp_config(tiny_llama, tiny_qa_jsonl, {"target_epsilon": 1.0})
    with pytest.raises(MedmergeError, match="exactly one"):
        _dp_config(tiny_llama, tiny_qa_jsonl, {"noise_multiplier": None})
