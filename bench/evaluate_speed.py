"""Evaluation speed, measured side by side in one run (real model, real questions, this machine).

1. Answer generation for N GenMedGPT-5k test questions with the embedded smollm2-135m: one question at a
   time (batch 1, the plain `model.generate` loop) vs `generate_answers` batched with left padding.
   Both greedy, KV cache on, same max_new_tokens; the answers must agree.
2. BERTScore of the generated answers: medmerge's implementation vs the `bert_score` package on the same
   MiniLM encoder (scores must agree to 1e-5).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/evaluate_speed.py [--n 16] [--max-new-tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medmerge.config import EvaluateSettings
from medmerge.data import load_split
from medmerge.evaluate.bertscore import bertscore, encoder_dir
from medmerge.evaluate.generate import generate_answers
from medmerge.models import load_model, load_tokenizer, resolve_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "chatdoctor5k.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model("smollm2-135m")
    model, tokenizer = load_model(path), load_tokenizer(path)
    pairs = load_split(f"genmedgpt:{DATA}", "test", limit=args.n)
    questions, references = [p.question for p in pairs], [p.answer for p in pairs]
    one_at_a_time = EvaluateSettings(max_new_tokens=args.max_new_tokens, batch_size=1)
    batched = EvaluateSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    one = generate_answers(model, tokenizer, questions, "causal", one_at_a_time, progress=False)
    many = generate_answers(model, tokenizer, questions, "causal", batched, progress=False)
    agree = sum(a == b for a, b in zip(one.texts, many.texts, strict=True))
    print(f"generation, {args.n} questions, ≤{args.max_new_tokens} new tokens, {args.threads} thread(s)")
    print(f"  batch 1 : {one.seconds:7.1f} s  {sum(one.new_tokens) / one.seconds:6.1f} new tokens/s")
    rate = sum(many.new_tokens) / many.seconds
    print(f"  batch {args.batch_size:<2}: {many.seconds:7.1f} s  {rate:6.1f} new tokens/s")
    print(f"  speed-up {one.seconds / many.seconds:.2f}×; identical answers {agree}/{args.n}")

    import bert_score

    bertscore(many.texts[:1], references[:1])  # load the encoder outside the timing (both load it once)
    bert_score.score(many.texts[:1], references[:1], model_type=str(encoder_dir()), num_layers=6)
    start = time.perf_counter()
    ours = bertscore(many.texts, references)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    _, _, f = bert_score.score(many.texts, references, model_type=str(encoder_dir()), num_layers=6)
    t_ref = time.perf_counter() - start
    diff = max(abs(a - b) for a, b in zip(ours["f1"], f.tolist(), strict=True))
    print(
        f"BERTScore (MiniLM), {args.n} pairs: medmerge {t_ours:.2f} s, bert_score {t_ref:.2f} s, "
        f"max |ΔF1| = {diff:.1e}"
    )


if __name__ == "__main__":
    main()
