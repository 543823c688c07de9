"""Per-answer text metrics: ROUGE-1/2/L, BLEU, chrF, answer length and repetition rate.

Every function takes `predictions` and `references` (equal-length lists of strings) and returns one
score per pair, so means, bootstrap intervals and paired tests are taken over questions.

- ROUGE-n / ROUGE-L: F-measure (rouge-score, Porter stemming, its default tokenizer), in [0, 1].
  ROUGE-L: LCS = longest common subsequence of the token lists; P = LCS/|pred|, R = LCS/|ref|,
  F = 2PR/(P+R).
- BLEU: sacrebleu sentence BLEU (exp smoothing, 13a tokenizer), in [0, 100].
- chrF: sacrebleu sentence chrF (character 6-grams, β = 2), in [0, 100].
- length: whitespace-separated words of the prediction.
- repetition (rep-n, Welleck et al. 2019): 1 − |distinct word n-grams| / |word n-grams| of the prediction
  (n = 4), 0 for answers shorter than n words; a model stuck in a loop scores near 1.
"""

from __future__ import annotations

from functools import lru_cache

from medmerge.errors import MedmergeError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise MedmergeError(
            f"metrics: {len(predictions)} predictions but {len(references)} references (expected equal)"
        )


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measures per pair: {"rouge1": [...], "rouge2": [...], "rougeL": [...]}."""
    _check(predictions, references)
    scorer = _rouge_scorer()
    out: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for name in ROUGE_TYPES:
            out[name].append(float(scores[name].fmeasure))
    return out


def bleu_scores(predictions: list[str], references: list[str]) -> list[float]:
    """Sentence BLEU per pair (sacrebleu, exp smoothing), 0–100."""
    from sacrebleu.metrics import BLEU

    _check(predictions, references)
    bleu = BLEU(effective_order=True)
    return [float(bleu.sentence_score(p, [r]).score) for p, r in zip(predictions, references, strict=True)]


def chrf_scores(predictions: list[str], references: list[str]) -> list[float]:
    """Sentence chrF per pair (sacrebleu defaults: char 6-grams, β = 2), 0–100."""
    from sacrebleu.metrics import CHRF

    _check(predictions, references)
    chrf = CHRF()
    return [float(chrf.sentence_score(p, [r]).score) for p, r in zip(predictions, references, strict=True)]


def corpus_bleu_chrf(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level BLEU and chrF (statistics pooled over all pairs before the score), 0–100."""
    from sacrebleu.metrics import BLEU, CHRF

    _check(predictions, references)
    return {
        "bleu": float(BLEU().corpus_score(predictions, [references]).score),
        "chrf": float(CHRF().corpus_score(predictions, [references]).score),
    }


def answer_lengths(texts: list[str]) -> list[float]:
    """Whitespace-separated words per text."""
    return [float(len(t.split())) for t in texts]


def repetition_rates(texts: list[str], n: int = 4) -> list[float]:
    """rep-n per text: 1 − distinct word n-grams / word n-grams (0 when fewer than n words)."""
    out = []
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        out.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return out


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """All lexical metrics per pair: rouge1, rouge2, rougeL, bleu, chrf, length, repetition."""
    return {
        **rouge_scores(predictions, references),
        "bleu": bleu_scores(predictions, references),
        "chrf": chrf_scores(predictions, references),
        "length": answer_lengths(predictions),
        "repetition": repetition_rates(predictions),
    }


# name → (label, direction): +1 higher is better, −1 lower is better, 0 neither (lengths)
METRICS: dict[str, tuple[str, int]] = {
    "loss": ("answer loss (nats/token)", -1),
    "perplexity": ("perplexity", -1),
    "rouge1": ("ROUGE-1 F", 1),
    "rouge2": ("ROUGE-2 F", 1),
    "rougeL": ("ROUGE-L F", 1),
    "bleu": ("BLEU (0-100)", 1),
    "chrf": ("chrF (0-100)", 1),
    "bertscore_precision": ("BERTScore P (MiniLM)", 1),
    "bertscore_recall": ("BERTScore R (MiniLM)", 1),
    "bertscore_f1": ("BERTScore F1 (MiniLM)", 1),
    "length": ("answer length (words)", 0),
    "repetition": ("repetition rate (rep-4)", -1),
    "accuracy": ("PubMedQA accuracy (yes/no/maybe)", 1),
    "accuracy_test": ("PubMedQA accuracy, official 500-question test half", 1),
}
