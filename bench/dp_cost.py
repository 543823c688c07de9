"""The cost of differential privacy: validation loss and throughput at ε ∈ {1, 4, 8, ∞}, side by side.

Same model (the embedded smollm2-135m), same MedQuAD training pairs (the first --train-examples of the
train split) and validation pairs, same steps, batch size, LoRA settings, learning rate and schedule,
same seed. ε = ∞ is medmerge's ordinary loop (token-weighted loss, global clipping, shuffled batches of
--batch-size pairs); each finite ε is DP-SGD (medmerge.train.privacy) at --unit (default group: one
MedQuAD focus topic with all its questions): Poisson sampling of units at q = batch / N (N units; the
batch counts units), clipping of each unit's summed gradient at C, noise σ calibrated by Opacus's PRV
accountant for the run's steps, δ = 1/(10·N), secret sampling and noise.

val loss = mean answer NLL (nats / token) of the validation pairs after the last step.
tokens/s = non-padding tokens of the timed steps (all but the first) / their wall-clock seconds.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/dp_cost.py [--data PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
MEDQUAD = ROOT / ".." / "shared" / "datasets" / "MedQuAD-master.zip"


def _config(args: argparse.Namespace, epsilon: float):
    from medmerge.config import TrainConfig, validate_config

    privacy = None
    if math.isfinite(epsilon):
        privacy = {
            "target_epsilon": epsilon,
            "max_grad_norm": args.clip,
            "accountant": "prv",
            "unit": args.unit,
        }
    return validate_config(
        {
            "model": "smollm2-135m",
            "method": "lora",
            "data": {"specs": [f"medquad:{Path(args.data).resolve()}"], "max_examples": args.train_examples},
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "warmup_steps": 2,
            "max_steps": args.steps,
            "max_prompt_tokens": args.max_tokens,
            "max_answer_tokens": args.max_tokens,
            "eval_examples": args.eval_examples,
            "threads": args.threads,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "privacy": privacy,
        },
        TrainConfig,
        "bench",
    )


def run_one(args: argparse.Namespace, epsilon: float, data, pad_id: int) -> dict:
    """Train `args.steps` steps at `epsilon` (inf = non-private); val loss, tokens/s, spent ε, σ."""
    import torch

    from medmerge.train.loop import Trainer
    from medmerge.train.model import build_model
    from medmerge.train.precision import Runtime, reuse_freed_memory, use_bf16_autocast
    from medmerge.train.privacy import PrivateTrainer

    config = _config(args, epsilon)
    torch.manual_seed(config.seed)
    device = torch.device("cpu")
    model, kind, _ = build_model(config, device)
    bf16 = use_bf16_autocast(config.autocast, device)
    runtime = Runtime(0, 1, device)
    if config.privacy:
        trainer = PrivateTrainer(
            config, model, kind, data.train, data.validation, pad_id, runtime, bf16, groups=data.train_groups
        )
    else:
        trainer = Trainer(config, model, kind, data.train, data.validation, pad_id, runtime, bf16)
    tokens, seconds = 0, 0.0
    with reuse_freed_memory():
        for step in range(args.steps):
            start = time.perf_counter()
            _, n = trainer.step()
            if step > 0:
                seconds += time.perf_counter() - start
                tokens += n
        val = trainer.validate()
    row = {"epsilon": epsilon, "val_loss": val, "tokens_per_s": tokens / max(seconds, 1e-9), "bf16": bf16}
    if config.privacy:
        record = trainer.record()
        row |= {"spent_epsilon": record.epsilon, "delta": record.delta, "sigma": record.noise_multiplier}
        row |= {"sample_rate": record.sample_rate, "units": record.train_units, "unit": record.unit_words}
        trainer.grad_module.remove_hooks()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(MEDQUAD), help="MedQuAD zip or folder")
    parser.add_argument("--work", default=None, help="work folder (default: a temp dir); results.json")
    parser.add_argument("--epsilons", default="inf,8,4,1")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="prompt and answer tokens each")
    parser.add_argument("--train-examples", type=int, default=2000, help="n, the site's training pairs")
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clipping bound C")
    parser.add_argument("--threads", type=int, default=1, help="1: other work shares the cores")
    parser.add_argument("--unit", default="group", choices=["group", "pair"], help="unit of privacy")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dp_cost-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from medmerge.models import load_tokenizer, resolve_model
    from medmerge.train.examples import prepare_data

    torch.set_num_threads(args.threads)
    first = _config(args, math.inf)
    tokenizer = load_tokenizer(resolve_model(first.model))
    data = prepare_data(first, tokenizer, "causal")
    rows = [run_one(args, float(e), data, tokenizer.pad_token_id) for e in args.epsilons.split(",")]
    base = next((r for r in rows if not math.isfinite(r["epsilon"])), rows[0])
    n = len(data.train)
    private = next((r for r in rows if "units" in r), None)
    units = f", N = {private['units']} units ({private['unit']}), δ = 1/(10·N)" if private else ""
    print(
        f"\nsmollm2-135m LoRA on MedQuAD: {n} train pairs{units}, {len(data.validation)} validation, "
        f"{args.steps} steps × batch {args.batch_size} (units under DP, pairs at ∞), ≤ {args.max_tokens}+"
        f"{args.max_tokens} tokens, C = {args.clip}, PRV accountant, {args.threads} threads, "
        f"bf16 = {rows[0]['bf16']}"
    )
    print(
        f"{'target ε':>9} {'spent ε':>9} {'σ':>7} {'val loss':>9} {'Δ vs ∞':>8} {'tokens/s':>9}"
        f" {'× non-DP':>9}"
    )
    for r in rows:
        eps = "∞" if not math.isfinite(r["epsilon"]) else f"{r['epsilon']:g}"
        spent = f"{r['spent_epsilon']:.3f}" if "spent_epsilon" in r else "—"
        sigma = f"{r['sigma']:.3f}" if "sigma" in r else "—"
        print(
            f"{eps:>9} {spent:>9} {sigma:>7} {r['val_loss']:>9.4f} {r['val_loss'] - base['val_loss']:>+8.4f} "
            f"{r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / base['tokens_per_s']:>8.2f}×"
        )
    (work / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
