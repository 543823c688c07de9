"""Does an exported model still compute the PyTorch model? Greedy agreement and log-prob difference.

For each prompt x, the PyTorch reference decodes greedily for N steps with eos excluded (so every prompt
gives exactly N positions): y_t = argmax_{v ∉ eos} p_ref(v | x, y_<t). The exported model is then run
teacher-forced on the same (x, y):

    token match   = (1/|P|N) Σ_x Σ_t [argmax_{v ∉ eos} p_exp(v | x, y_<t) = y_t]      (fraction, 0..1)
    mean |Δlogp|  = (1/|P|N) Σ_x Σ_t |log p_ref(y_t | x, y_<t) − log p_exp(y_t | x, y_<t)|   (nats/token)
    max  |Δlogp|  = the largest such difference

Teacher forcing keeps one early disagreement from cascading into the rest of the sequence. An export
passes when token match ≥ min_match and mean |Δlogp| ≤ max_mean_logprob_diff for its precision class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.export.engines import Engine, prompt_ids
from medmerge.export.torch_engine import TorchEngine

AGREEMENT_QUESTIONS = (
    "What are the symptoms of diabetes?",
    "How can high blood pressure be prevented?",
    "What causes iron deficiency anemia?",
    "Is asthma inherited?",
)

# precision class → (min token match, max mean |Δlogp| in nats/token). Measured on SmolLM2-135M (4 prompts ×
# 16 tokens): ct2 float32 1.000 / 0.0000, bfloat16 1.000 / 0.0039, int8_float32 0.922 / 0.089,
# GGUF q8_0 0.969 / 0.018. On the tiny test models a missing RoPE permutation gives 1.7 nats/token.
TOLERANCES: dict[str, tuple[float, float]] = {
    "exact": (0.95, 0.01),  # float32: only summation order differs
    "half": (0.90, 0.05),  # float16 / bfloat16 weights
    "int8": (0.75, 0.25),  # 8-bit weights (CTranslate2 int8*, GGUF q8_0)
    "int4": (0.50, 0.75),  # 4-bit weights (GGUF q4_0)
}


def precision_class(quantization: str) -> str:
    """'exact', 'half', 'int8' or 'int4' for a CTranslate2 or GGUF quantization name."""
    if quantization in ("float32", "f32"):
        return "exact"
    if quantization in ("float16", "bfloat16", "f16", "bf16"):
        return "half"
    if quantization.startswith("int8") or quantization == "q8_0":
        return "int8"
    if quantization.startswith("q4"):
        return "int4"
    raise MedmergeError(f"quantization {quantization!r}: no agreement tolerance known for it")


@dataclass(frozen=True)
class Agreement:
    """Outcome of an agreement check (see the module docstring for the definitions)."""

    engine: str
    prompts: int
    tokens: int
    token_match: float
    mean_abs_logprob_diff: float
    max_abs_logprob_diff: float
    min_match: float
    max_mean_logprob_diff: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"agreement {verdict} ({self.engine}, {self.prompts} prompts, {self.tokens} tokens): "
            f"greedy token match {self.token_match:.3f} (need ≥ {self.min_match}), mean |Δlogp| "
            f"{self.mean_abs_logprob_diff:.4f} nats (need ≤ {self.max_mean_logprob_diff}), "
            f"max {self.max_abs_logprob_diff:.4f}"
        )


def reference_continuations(
    reference: TorchEngine, prompts: list[list[int]], n_tokens: int
) -> list[list[int]]:
    """Greedy continuations of exactly `n_tokens` ids under the reference, eos excluded."""
    return [list(reference.stream_ids(p, n_tokens, ban=reference.eos)) for p in prompts]


def measure_agreement(
    reference: TorchEngine,
    exported: Engine,
    *,
    questions: tuple[str, ...] = AGREEMENT_QUESTIONS,
    n_tokens: int = 16,
    min_match: float,
    max_mean_logprob_diff: float,
) -> Agreement:
    """Compare `exported` with `reference` on `questions` (prompts built with the chat template)."""
    prompts = [prompt_ids(reference, q) for q in questions]
    conts = reference_continuations(reference, prompts, n_tokens)
    ban = sorted(set(reference.eos) | set(exported.eos))
    matches, diffs = 0, []
    for prompt, cont in zip(prompts, conts, strict=True):
        ref_logp = reference.score(prompt, cont)
        exp_logp = exported.score(prompt, cont)
        diffs += [abs(a - b) for a, b in zip(ref_logp, exp_logp, strict=True)]
        matches += sum(a == b for a, b in zip(exported.argmax_next(prompt, cont, ban), cont, strict=True))
    n = len(diffs)
    match, mean_diff = matches / n, sum(diffs) / n
    return Agreement(
        engine=exported.name,
        prompts=len(prompts),
        tokens=n,
        token_match=match,
        mean_abs_logprob_diff=mean_diff,
        max_abs_logprob_diff=max(diffs),
        min_match=min_match,
        max_mean_logprob_diff=max_mean_logprob_diff,
        passed=match >= min_match and mean_diff <= max_mean_logprob_diff,
    )


def require_agreement(agreement: Agreement, where: str) -> None:
    """Raise a one-line MedmergeError when an export diverges beyond its tolerance."""
    if not agreement.passed:
        raise MedmergeError(f"{where}: exported model diverges from the PyTorch model; {agreement.summary()}")
