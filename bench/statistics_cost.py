"""What `medmerge stats` costs, before and after, beside the expert's own training time.

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/statistics_cost.py runs/stats/nci \
        --examples 64 --fisher-examples 16 --batch-size 8 --threads 2 --before 0fc7de2

One process, one model, the same sampled training questions (as `compute_statistics` samples them):
- before: the statistics module of git revision `--before` (loaded from `git show`), its Gram pass
  (no_grad, batches) then its Fisher (one backward pass per example, gradients of every weight);
- after: this tree's `collect_statistics` (the Fisher in batches with per-example gradients from hooks,
  whose forwards also add their examples' Grams; the other examples' Grams in inference mode).
Both results are compared (largest relative Frobenius difference over all tensors). The training time is
the expert's own `manifest.json` (`metrics.loop_minutes`: the training loop, the same settings).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from medmerge.models import load_model, load_tokenizer, model_kind
from medmerge.site_stats import write_statistics
from medmerge.threads import use_threads
from medmerge.train.examples import prepare_data
from medmerge.train.statistics import (
    base_weight_names,
    collect_statistics,
    expert_train_config,
    statistic_linears,
)


def _old_module(revision: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:src/medmerge/train/statistics.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("medmerge_statistics_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:statistics.py", "exec"), module.__dict__)
    return module


def _difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, x in a.items():
        y = b[name].to(x.dtype)
        worst = max(worst, float((x - y).norm() / y.norm().clamp(min=1e-30)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("expert", type=Path)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--fisher-examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", default=None, help="git revision to time as 'before' (skip: none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    use_threads(args.threads)

    timings: dict[str, float] = {}
    t = time.perf_counter()
    config, _ = expert_train_config(args.expert, None)
    tokenizer = load_tokenizer(args.expert)
    data = prepare_data(config, tokenizer, model_kind(args.expert))
    n = max(args.examples, args.fisher_examples)
    order = random.Random(config.seed).sample(range(len(data.train)), n)
    picked = [data.train[i] for i in order]
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    model = load_model(args.expert)
    modules = statistic_linears(model, base_weight_names(args.expert))
    timings["model"] = time.perf_counter() - t
    pad = tokenizer.pad_token_id
    tokens = sum(len(e["input_ids"]) for e in picked[: args.examples])

    t = time.perf_counter()
    grams, fishers = collect_statistics(
        model, modules, picked, args.examples, args.fisher_examples, pad, args.batch_size
    )
    timings["after"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory(dir=args.expert.parent) as scratch:
        t = time.perf_counter()
        write_statistics(scratch, grams.float32(), fishers, {"examples": n}, aliases=grams.aliases)
        timings["write"] = time.perf_counter() - t
    result: dict = {"examples": args.examples, "fisher_examples": args.fisher_examples, "tokens": tokens}
    if args.before:
        old = _old_module(args.before)
        t = time.perf_counter()
        old_grams = old.collect_grams(model, modules, picked[: args.examples], pad, args.batch_size)
        timings["before_gram"] = time.perf_counter() - t
        t = time.perf_counter()
        old_fishers = old.collect_fishers(model, modules, picked[: args.fisher_examples], pad)
        timings["before_fisher"] = time.perf_counter() - t
        timings["before"] = timings["before_gram"] + timings["before_fisher"]
        result["gram_rel_diff"] = _difference(grams.sums, old_grams.sums)
        result["fisher_rel_diff"] = _difference(fishers, old_fishers)
    manifest = json.loads((args.expert / "manifest.json").read_text())
    metrics = manifest.get("metrics", {})
    result["train_loop_s"] = 60 * float(metrics.get("loop_minutes", float("nan")))
    result["train_steps"] = metrics.get("steps")
    result["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    result["after_over_training"] = timings["after"] / result["train_loop_s"]
    step = timings["data"] + timings["model"] + timings["after"] + timings["write"]
    result["after_whole_step_s"] = round(step, 2)
    result["after_whole_step_over_training"] = step / result["train_loop_s"]
    if args.before:
        result["before_over_training"] = timings["before"] / result["train_loop_s"]
    result["load"] = Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
