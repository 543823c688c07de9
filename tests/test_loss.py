"""Answer loss and perplexity of tiny models against a manual, one-example-at-a-time computation."""

from __future__ import annotations

import math

import pytest
import torch

from medmerge.data import encode_pair, load_split
from medmerge.evaluate.scorer import encode_loss_batches, per_question_loss, validation_loss_scorer
from medmerge.loss import answer_loss, answer_loss_per_example, batch_nll
from medmerge.models import load_model, load_tokenizer

QA = [
    ("What is diabetes ?", "Diabetes is a disease in which blood glucose levels are too high."),
    ("What causes anemia ?", "Too few red blood cells."),
    ("How to prevent influenza ?", "Get a flu vaccine every year and wash your hands often."),
]


def manual_nll(model, example: dict[str, list[int]], kind: str) -> tuple[float, int]:
    """Σ −log softmax(logits)[next token] over the answer tokens of ONE unpadded example."""
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        if kind == "causal":
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
            labels = example["labels"]
            terms = [-logp[t - 1, labels[t]] for t in range(1, len(labels)) if labels[t] != -100]
        else:
            labels = torch.tensor([example["labels"]])
            logp = torch.log_softmax(model(input_ids=ids, labels=labels).logits[0].double(), dim=-1)
            terms = [-logp[t, y] for t, y in enumerate(example["labels"])]
    return float(sum(terms)), len(terms)


@pytest.mark.parametrize("fixture,kind", [("tiny_llama", "causal"), ("tiny_t5", "seq2seq")])
def test_loss_and_perplexity_match_manual(fixture: str, kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    model, tokenizer = load_model(path), load_tokenizer(path)
    examples = [encode_pair(q, a, tokenizer, kind) for q, a in QA]
    manual = [manual_nll(model, e, kind) for e in examples]

    from medmerge.data import QAPair

    pairs = [QAPair(id=str(i), question=q, answer=a, source="t") for i, (q, a) in enumerate(QA)]
    batches, order = encode_loss_batches(pairs, tokenizer, kind, batch_size=2)  # padded, reordered
    nll, tokens = per_question_loss(model, batches, order)
    assert tokens == [n for _, n in manual]
    assert nll == pytest.approx([s for s, _ in manual], rel=1e-4)

    loss = answer_loss(model, batches)
    total = sum(s for s, _ in manual)
    count = sum(n for _, n in manual)
    assert loss.tokens == count
    assert loss.mean == pytest.approx(total / count, rel=1e-4)
    assert loss.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
    sums, counts = answer_loss_per_example(model, batches)
    assert sum(sums) / sum(counts) == pytest.approx(loss.mean, rel=1e-6)
    with torch.no_grad():
        summed, n = batch_nll(model, batches[0])  # the training entry point still sums one batch
    assert float(summed) == pytest.approx(sum(sums[: len(batches[0]["input_ids"])]), rel=1e-5)
    assert n == sum(counts[: len(batches[0]["input_ids"])])


def test_validation_loss_scorer_equals_answer_loss(tiny_llama, tiny_qa_jsonl) -> None:
    spec = f"jsonl:{tiny_qa_jsonl}"
    model, tokenizer = load_model(tiny_llama), load_tokenizer(tiny_llama)
    fractions = (0.5, 0.25, 0.25)
    score = validation_loss_scorer([spec], tokenizer, "causal", fractions=fractions, batch_size=3)
    pairs = load_split(spec, "validation", 0, fractions)
    assert pairs
    manual = [
        manual_nll(model, encode_pair(p.question, p.answer, tokenizer, "causal"), "causal") for p in pairs
    ]
    assert score(model) == pytest.approx(sum(s for s, _ in manual) / sum(n for _, n in manual), rel=1e-4)


def _full_logits_nll(model, batch) -> torch.Tensor:
    """Reference: Σ CE over full (B, T, V) logits, shifted by one, ignoring -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        batch["labels"][:, 1:].reshape(-1),
        reduction="sum",
    )


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_answer_only_logits_equal_full_logits_with_gradients(tiny_llama, wrap: str) -> None:
    """The answer-position head path gives the same loss, per-token NLL and gradients as full logits."""
    from medmerge.data import pad_batch
    from medmerge.loss import answer_only_head, token_nll

    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_llama), load_tokenizer(tiny_llama)
    if wrap == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B = 0 would hide the adapter's part of the gradient
    assert answer_only_head(model) is not None
    examples = [encode_pair(q, a, tokenizer, "causal") for q, a in QA]
    batch = pad_batch(examples, tokenizer.pad_token_id)  # padding and masked prompts in every row
    params = [p for p in model.parameters() if p.requires_grad]

    fast, n = batch_nll(model, batch)
    fast_grads = torch.autograd.grad(fast, params)
    reference = _full_logits_nll(model, batch)
    ref_grads = torch.autograd.grad(reference, params)
    assert n == int((batch["labels"][:, 1:] != -100).sum()) > 0
    assert float(fast.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for g, r in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)

    nll, mask = token_nll(model, batch)  # per-token values land on their own positions
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    expected = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(nll.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, labels != -100)


def test_seq2seq_keeps_the_full_logits_path(tiny_t5) -> None:
    from medmerge.loss import answer_only_head

    assert answer_only_head(load_model(tiny_t5)) is None


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_answer_head_nll_equals_cross_entropy(monkeypatch, chunk_rows: int) -> None:
    """Fused chunked NLL = cross_entropy(h Wᵀ, y), values and ∂/∂h, whatever the chunking."""
    import medmerge.loss as loss

    monkeypatch.setattr(loss, "_CHUNK_BYTES", 4 * 50 * chunk_rows)
    torch.manual_seed(0)
    h = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    w, y, g = torch.randn(50, 16, dtype=torch.float64), torch.randint(0, 50, (23,)), torch.randn(23)
    reference = torch.nn.functional.cross_entropy(h @ w.T, y, reduction="none")
    (ref_grad,) = torch.autograd.grad((reference * g).sum(), h)
    fused = loss.answer_head_nll(h, w, y)
    (grad,) = torch.autograd.grad((fused * g).sum(), h)
    torch.testing.assert_close(fused, reference.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(loss.answer_head_nll(h, w, y), reference.float(), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # matmuls in bf16, as the head's Linear would run
        bf16 = loss.answer_head_nll(h.float(), w.float(), y)
        expected = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(h.float(), w.float()).float(), y, reduction="none"
        )
    torch.testing.assert_close(bf16, expected, rtol=0, atol=1e-5)
