"""The agreement check: exact numbers on known perturbations, tolerance classes, loud failure."""

from __future__ import annotations

import shutil

import pytest
import torch

from medmerge.errors import MedmergeError
from medmerge.export.agreement import (
    TOLERANCES,
    measure_agreement,
    precision_class,
    reference_continuations,
    require_agreement,
)
from medmerge.export.engines import prompt_ids
from medmerge.export.torch_engine import TorchEngine


def test_precision_classes_cover_every_export_quantization():
    from medmerge.export.ct2 import CT2_QUANTIZATIONS
    from medmerge.export.gguf import GGUF_QUANTIZATIONS

    assert precision_class("float32") == precision_class("f32") == "exact"
    assert precision_class("bfloat16") == precision_class("f16") == "half"
    assert precision_class("int8_float32") == precision_class("q8_0") == "int8"
    assert precision_class("q4_0") == "int4"
    for q in CT2_QUANTIZATIONS + GGUF_QUANTIZATIONS:
        assert precision_class(q) in TOLERANCES
    # coarser weights get looser tolerances, never tighter
    order = [TOLERANCES[c] for c in ("exact", "half", "int8", "int4")]
    assert all(a[0] >= b[0] and a[1] <= b[1] for a, b in zip(order, order[1:], strict=False))
    with pytest.raises(MedmergeError, match="no agreement tolerance"):
        precision_class("int3")


def test_identical_models_agree_exactly(sharp_llama):
    ref, same = TorchEngine(sharp_llama), TorchEngine(sharp_llama)
    a = measure_agreement(ref, same, n_tokens=8, min_match=1.0, max_mean_logprob_diff=0.0)
    assert a.passed and a.token_match == 1.0 and a.mean_abs_logprob_diff == 0.0
    assert a.prompts == 4 and a.tokens == 32


def test_reference_continuations_are_greedy_without_eos(sharp_llama):
    ref = TorchEngine(sharp_llama)
    prompt = prompt_ids(ref, "What is asthma?")
    (cont,) = reference_continuations(ref, [prompt], 12)
    assert len(cont) == 12 and not set(cont) & set(ref.eos)
    # each id is the argmax of the full forward pass over the prefix (eos excluded)
    assert ref.argmax_next(prompt, cont, ref.eos) == cont


def test_logprob_difference_matches_hand_computation(sharp_llama, tmp_path):
    perturbed = tmp_path / "perturbed"
    shutil.copytree(sharp_llama, perturbed)
    ref, other = TorchEngine(sharp_llama), TorchEngine(perturbed)
    with torch.no_grad():
        other.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    questions = ("What is gout?",)
    a = measure_agreement(
        ref, other, questions=questions, n_tokens=6, min_match=0.0, max_mean_logprob_diff=9.0
    )

    prompt = prompt_ids(ref, questions[0])
    (cont,) = reference_continuations(ref, [prompt], 6)
    ids = torch.tensor([prompt + cont[:-1]])
    with torch.no_grad():
        lp_ref = torch.log_softmax(ref.model(ids).logits[0], -1)[len(prompt) - 1 :]  # (6, V)
        lp_oth = torch.log_softmax(other.model(ids).logits[0], -1)[len(prompt) - 1 :]
    idx = torch.tensor(cont)[:, None]
    diff = (lp_ref.gather(1, idx) - lp_oth.gather(1, idx)).abs()[:, 0]
    lp_oth[:, ref.eos] = -torch.inf
    match = (lp_oth.argmax(-1) == torch.tensor(cont)).float().mean()
    assert a.mean_abs_logprob_diff == pytest.approx(float(diff.mean()), abs=1e-6)
    assert a.max_abs_logprob_diff == pytest.approx(float(diff.max()), abs=1e-6)
    assert a.token_match == pytest.approx(float(match))
    assert a.mean_abs_logprob_diff > 0.05  # the perturbation is visible

    strict = measure_agreement(
        ref, other, questions=questions, n_tokens=6, min_match=0.0, max_mean_logprob_diff=0.01
    )
    assert not strict.passed
    with pytest.raises(MedmergeError, match="diverges from the PyTorch model.*FAILED"):
        require_agreement(strict, "out")
