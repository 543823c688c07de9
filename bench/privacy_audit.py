"""Privacy audit: does DP-SGD's ε hold against the attacks it is meant to stop? Measured on the real model.

One MedQuAD site (one source collection), the embedded smollm2-135m with LoRA, trained at each
ε ∈ --epsilons (∞ = medmerge's ordinary loop; finite = DP-SGD, group unit = one MedQuAD focus topic
with all its questions, δ = 1/(10·N), PRV accountant, medmerge.train.privacy). Same data, epochs,
learning rate and seed for every ε.

(a) Membership inference, loss ratio against the base model (the offline-LiRA family with the base
    model as its one reference): score(x) = NLL_base(x) − NLL_model(x) (mean nats per answer token);
    held-in pairs (trained on) against held-out pairs (same collection, other focus topics, never
    trained on). Reported: ROC AUC (0.5 = chance) and the true-positive rate at ≤ 1 % false positives.
(b) Canary exposure (Carlini et al. 2019, "The Secret Sharer"): --canaries random 6-digit codes per
    repetition level, each a Q&A pair "What is the lab code of patient NAME?" → "The lab code of patient
    NAME is DDDDDD." inserted --repeats times (1, 4, 16) as one group (one person's records: one unit).
    Each canary's answer NLL is ranked among --candidates random codes in the same sentence:
    exposure = log2(K + 1) − log2(rank) (rank 1 = the true code is the model's likeliest: the maximum,
    log2(K + 1)), and the Gaussian-fit estimate −log2 Φ((nll_true − μ) / s) over the candidates' NLLs,
    which extends past K. Chance: a uniform rank gives E[exposure] ≈ log2(e) ≈ 1.44 bits (the base
    model's row is printed as the reference).

Randomness: the site's split, the canaries and their candidates come from --seed (public: the audit
must be repeatable); DP's sampling and noise are secret (os.urandom), so finite-ε rows vary run to run.

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/privacy_audit.py [--work DIR] [--measure]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
MEDQUAD = ROOT / ".." / "shared" / "datasets" / "MedQuAD-master.zip"
NAMES = ["Ada", "Bram", "Chiara", "Dmitri", "Esra", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]


def _pairs(args: argparse.Namespace) -> tuple[list, list, list]:
    """(held-in, held-out, validation) MedQuAD pairs of the collection: whole focus groups, seeded."""
    from medmerge.data import load_dataset
    from medmerge.data.split import deduplicate

    pairs = deduplicate(
        load_dataset(f"medquad:{Path(args.data).resolve()}?collections={args.collection}").pairs
    )
    groups: dict[str, list] = {}
    for p in pairs:
        groups.setdefault(p.privacy_group() or p.id, []).append(p)
    keys = sorted(groups)
    random.Random(args.seed).shuffle(keys)
    sets: list[list] = [[], [], []]
    targets = [args.pairs, args.pairs, args.validation]
    for key in keys:
        for k, target in enumerate(targets):
            if len(sets[k]) < target:
                sets[k].extend(groups[key][: args.max_group])
                break
    return sets[0], sets[1], sets[2]


def _canaries(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--canaries per repetition level: name, secret code, repeats, and --candidates other codes."""
    rng = random.Random(args.seed + 1)
    out = []
    for repeats in [int(r) for r in args.repeats.split(",")]:
        for i in range(args.canaries):
            name = f"{rng.choice(NAMES)}-{rng.randrange(1000, 9999)}"
            code = f"{rng.randrange(10**6):06d}"
            others: set[str] = set()
            while len(others) < args.candidates:
                other = f"{rng.randrange(10**6):06d}"
                if other != code:
                    others.add(other)
            out.append(
                {"name": name, "code": code, "repeats": repeats, "index": i, "candidates": sorted(others)}
            )
    return out


def _canary_pair(name: str, code: str) -> tuple[str, str]:
    return f"What is the lab code of patient {name}?", f"The lab code of patient {name} is {code}."


def _encode(tokenizer: Any, question: str, answer: str, args: argparse.Namespace) -> dict:
    from medmerge.data import encode_pair

    return encode_pair(
        question, answer, tokenizer, "causal", args.max_prompt_tokens, args.max_answer_tokens, args.system
    )


def _config(args: argparse.Namespace, epsilon: float, spec: str):
    from medmerge.config import TrainConfig, validate_config

    private = math.isfinite(epsilon)
    privacy = {"target_epsilon": epsilon, "max_grad_norm": args.clip, "unit": "group"} if private else None
    return validate_config(
        {
            "model": "smollm2-135m",
            "method": "lora",
            "data": {"specs": [spec]},
            "batch_size": args.batch_units if private else args.batch_pairs,
            "learning_rate": args.lr,
            "warmup_steps": 2,
            "epochs": args.epochs,
            "max_prompt_tokens": args.max_prompt_tokens,
            "max_answer_tokens": args.max_answer_tokens,
            "eval_every": 0,
            "keep_best": False,
            "checkpoint_every": 0,
            "threads": args.threads,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "system_prompt": args.system,
            "privacy": privacy,
        },
        TrainConfig,
        "privacy audit",
    )


def _losses(
    model: Any, examples: list[dict], pad_id: int, bf16: bool, batch: int = 32
) -> list[tuple[float, float]]:
    """(mean NLL per answer token, summed NLL) of each example (nats), in order."""
    import torch

    from medmerge.data import pad_batch
    from medmerge.train.precision import autocast_context
    from medmerge.train.privacy import example_losses

    out: list[tuple[float, float]] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(examples), batch):
            padded = pad_batch(examples[start : start + batch], pad_id)
            with autocast_context(bf16, torch.device("cpu")):
                means, sums = example_losses(model, padded)
            out += list(zip(means.float().tolist(), sums.float().tolist(), strict=True))
    model.train()
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _suffix_nlls(model: Any, candidates: list[dict], bf16: bool, batch: int = 64) -> list[float]:
    """Σ NLL (nats) of each candidate's tokens after the candidates' common token prefix, which is run
    once and its KV cache reused (the prompt and "The lab code of patient NAME is" are shared; only the
    code, the full stop and eos differ). The prefix's own NLL is the same for every candidate, so ranks
    are those of the full answers' NLLs."""
    import copy

    import torch

    from medmerge.train.precision import autocast_context

    ids = [c["input_ids"] for c in candidates]
    p = min(_common_prefix(ids[0], other) for other in ids[1:])
    cpu = torch.device("cpu")
    out: list[float] = []
    with torch.inference_mode(), autocast_context(bf16, cpu):
        first = model(input_ids=torch.tensor([ids[0][:p]]), use_cache=True)
        first_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        for start in range(0, len(ids), batch):
            suffixes = [i[p:] for i in ids[start : start + batch]]
            width = max(len(s) for s in suffixes)
            x = torch.tensor([s + [0] * (width - len(s)) for s in suffixes])  # right padding: never read
            cache = copy.deepcopy(first.past_key_values)
            cache.batch_repeat_interleave(len(suffixes))
            logp = torch.log_softmax(
                model(input_ids=x, past_key_values=cache, use_cache=True).logits.float(), -1
            )
            for b, s in enumerate(suffixes):
                nll = -float(first_logp[s[0]]) - sum(float(logp[b, k - 1, s[k]]) for k in range(1, len(s)))
                out.append(nll)
    return out


def _score(model: Any, data: dict, pad_id: int, bf16: bool) -> dict[str, Any]:
    """Per-pair losses of held-in / held-out pairs and each canary's candidate NLLs (true code first)."""
    held_in = [m for m, _ in _losses(model, data["held_in"], pad_id, bf16)]
    held_out = [m for m, _ in _losses(model, data["held_out"], pad_id, bf16)]
    model.eval()
    canaries = [_suffix_nlls(model, candidates, bf16) for candidates in data["canary_candidates"]]
    model.train()
    return {"held_in": held_in, "held_out": held_out, "canaries": canaries}


def auc_and_tpr(positives: list[float], negatives: list[float], fpr: float = 0.01) -> tuple[float, float]:
    """ROC AUC (Mann–Whitney, ties ½) and the TPR at the largest threshold with FPR ≤ `fpr`."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    auc = wins / (len(positives) * len(negatives))
    allowed = math.floor(fpr * len(negatives))  # false positives allowed
    threshold = sorted(negatives, reverse=True)[allowed] if allowed < len(negatives) else -math.inf
    return auc, sum(p > threshold for p in positives) / len(positives)


def exposure(candidate_nlls: list[float]) -> tuple[float, float]:
    """(rank exposure, Gaussian-fit exposure) in bits of a canary whose true NLL is candidate_nlls[0]."""
    true, others = candidate_nlls[0], candidate_nlls[1:]
    rank = 1 + sum(o < true for o in others) + 0.5 * sum(o == true for o in others)
    mu = sum(others) / len(others)
    sd = math.sqrt(sum((o - mu) ** 2 for o in others) / (len(others) - 1))
    tail = 0.5 * math.erfc(-((true - mu) / sd) / math.sqrt(2))  # Φ((true − μ) / s)
    return math.log2(len(candidate_nlls)) - math.log2(rank), -math.log2(max(tail, 1e-300))


def _summary(scores: dict[str, Any], base: dict[str, Any], canaries: list[dict]) -> dict[str, Any]:
    ratio_in = [b - m for b, m in zip(base["held_in"], scores["held_in"], strict=True)]
    ratio_out = [b - m for b, m in zip(base["held_out"], scores["held_out"], strict=True)]
    auc, tpr = auc_and_tpr(ratio_in, ratio_out)
    levels: dict[int, list[tuple[float, float]]] = {}
    for canary, nlls in zip(canaries, scores["canaries"], strict=True):
        levels.setdefault(canary["repeats"], []).append(exposure(nlls))
    return {
        "auc": auc,
        "tpr_at_1pct_fpr": tpr,
        "loss_held_in": sum(scores["held_in"]) / len(scores["held_in"]),
        "loss_held_out": sum(scores["held_out"]) / len(scores["held_out"]),
        "exposure": {r: sum(e for e, _ in v) / len(v) for r, v in sorted(levels.items())},
        "exposure_fit": {r: sum(f for _, f in v) / len(v) for r, v in sorted(levels.items())},
    }


def run_one(args: argparse.Namespace, epsilon: float, data: dict, spec: str, pad_id: int) -> dict[str, Any]:
    """Train at `epsilon` on held-in + canaries, then score; the trained model is freed after."""
    import torch

    from medmerge.train.loop import Trainer
    from medmerge.train.model import build_model
    from medmerge.train.precision import Runtime, use_bf16_autocast
    from medmerge.train.privacy import PrivateTrainer

    config = _config(args, epsilon, spec)
    torch.manual_seed(config.seed)
    device = torch.device("cpu")
    model, kind, _ = build_model(config, device)
    bf16 = use_bf16_autocast(config.autocast, device)
    runtime = Runtime(0, 1, device)
    base_scores = None
    if data.get("base") is None:  # LoRA's B starts at 0: the fresh model is the base model
        started = time.perf_counter()
        base_scores = _score(model, data, pad_id, bf16)
        print(f"base model scored in {time.perf_counter() - started:.0f} s", flush=True)
    if config.privacy is not None:
        trainer = PrivateTrainer(
            config,
            model,
            kind,
            data["train"],
            data["validation"],
            pad_id,
            runtime,
            bf16,
            groups=data["groups"],
        )
    else:
        trainer = Trainer(config, model, kind, data["train"], data["validation"], pad_id, runtime, bf16)
    if args.measure:
        trainer.total_steps = args.measure
    started = time.perf_counter()
    state = trainer.run(lambda t: None, progress=False)
    seconds = time.perf_counter() - started
    row: dict[str, Any] = {
        "epsilon": epsilon,
        "steps": state.step,
        "train_s": seconds,
        "val_loss": state.last_val,
    }
    if config.privacy is not None:
        record = trainer.record()
        row |= {
            "spent_epsilon": record.epsilon,
            "delta": record.delta,
            "sigma": record.noise_multiplier,
            "sample_rate": record.sample_rate,
            "units": record.train_units,
            "unit": record.unit_words,
        }
    started = time.perf_counter()
    row["scores"] = _score(model, data, pad_id, bf16)
    row["score_s"] = time.perf_counter() - started
    if base_scores is not None:
        row["base_scores"] = base_scores
    return row


def _table(rows: list[dict], repeats: list[int]) -> str:
    head = "| target ε | spent ε (δ) | σ | steps | MIA AUC | TPR @ 1% FPR | loss in / out |"
    head += "".join(f" exposure ×{r} (fit) |" for r in repeats)
    lines = [head, "|" + "---|" * (7 + len(repeats))]
    for r in rows:
        s = r["summary"]
        eps = "∞" if not math.isfinite(r["epsilon"]) else f"{r['epsilon']:g}"
        spent = f"{r['spent_epsilon']:.2f} ({r['delta']:.1e})" if "spent_epsilon" in r else "—"
        sigma = f"{r['sigma']:.2f}" if "sigma" in r else "—"
        cells = [
            eps,
            spent,
            sigma,
            str(r["steps"]),
            f"{s['auc']:.3f}",
            f"{s['tpr_at_1pct_fpr']:.3f}",
            f"{s['loss_held_in']:.3f} / {s['loss_held_out']:.3f}",
        ]
        cells += [f"{s['exposure'][k]:.2f} ({s['exposure_fit'][k]:.1f})" for k in repeats]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict], repeats: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["∞" if not math.isfinite(r["epsilon"]) else f"{r['epsilon']:g}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    ax1.plot(x, [r["summary"]["auc"] for r in rows], "o-", label="MIA AUC (loss ratio vs base)")
    ax1.plot(x, [r["summary"]["tpr_at_1pct_fpr"] for r in rows], "s-", label="TPR at 1% FPR")
    ax1.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="AUC chance")
    ax1.axhline(0.01, color="grey", linestyle="--", linewidth=1, label="TPR chance")
    ax1.set_xticks(list(x), labels)
    ax1.set_xlabel("target ε")
    ax1.set_ylim(0, 1)
    ax1.set_title("membership inference")
    ax1.legend(fontsize=8)
    for r, label in zip(rows, labels, strict=True):
        ax2.plot(repeats, [r["summary"]["exposure"][k] for k in repeats], "o-", label=f"ε = {label}")
    ax2.axhline(1 / math.log(2), color="grey", linestyle=":", linewidth=1, label="chance (≈ 1.44 bits)")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(repeats, [str(k) for k in repeats])
    ax2.set_xlabel("canary repetitions (one group)")
    ax2.set_ylabel("exposure (bits, rank among candidates)")
    ax2.set_title("canary exposure")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(MEDQUAD), help="MedQuAD zip or folder")
    parser.add_argument("--collection", default="3_GHR_QA", help="the site: one MedQuAD collection")
    parser.add_argument("--work", default=None, help="output folder (default: a temp dir)")
    parser.add_argument("--epsilons", default="inf,8,4,1")
    parser.add_argument("--pairs", type=int, default=48, help="held-in pairs (and as many held-out)")
    parser.add_argument("--validation", type=int, default=8)
    parser.add_argument("--max-group", type=int, default=4, help="pairs kept per focus topic")
    parser.add_argument("--canaries", type=int, default=10, help="canaries per repetition level")
    parser.add_argument("--repeats", default="1,4,16")
    parser.add_argument("--candidates", type=int, default=31, help="other codes each canary is ranked among")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-units", type=int, default=16, help="DP: expected groups per batch")
    parser.add_argument("--batch-pairs", type=int, default=16, help="∞: pairs per batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=48)
    parser.add_argument("--max-answer-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system", default="Medical Q&A.", help="system prompt (short: fewer tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=int, default=0, help="time this many steps per ε only")
    parser.add_argument("--report-only", action="store_true", help="table and plot of --work's rows only")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="privacy_audit-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from medmerge.models import load_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    held_in, held_out, validation = _pairs(args)
    canaries = _canaries(args)
    spec = f"jsonl:{work / 'site.jsonl'}"  # names the data for the unit's words; training reads `data`
    rows_for_file = [
        {"question": p.question, "answer": p.answer, "group": p.privacy_group()} for p in held_in
    ]
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    data: dict[str, Any] = {"train": [], "groups": [], "canaries": canaries, "base": None}
    for p in held_in:
        data["train"].append(_encode(tokenizer, p.question, p.answer, args))
        data["groups"].append(p.privacy_group())
    for c in canaries:
        question, answer = _canary_pair(c["name"], c["code"])
        for _ in range(c["repeats"]):
            data["train"].append(_encode(tokenizer, question, answer, args))
            data["groups"].append(f"canary:{c['repeats']}:{c['index']}")
            rows_for_file.append({"question": question, "answer": answer, "group": data["groups"][-1]})
    (work / "site.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_for_file))
    data["held_in"] = [_encode(tokenizer, p.question, p.answer, args) for p in held_in]
    data["held_out"] = [_encode(tokenizer, p.question, p.answer, args) for p in held_out]
    data["validation"] = [_encode(tokenizer, p.question, p.answer, args) for p in validation]
    data["canary_candidates"] = [
        [_encode(tokenizer, *_canary_pair(c["name"], code), args) for code in [c["code"], *c["candidates"]]]
        for c in canaries
    ]
    tokens = sum(len(e["input_ids"]) for e in data["train"])
    print(
        f"site {args.collection}: {len(held_in)} held-in pairs in {len(set(data['groups'])) - len(canaries)} "
        f"focus groups, {len(held_out)} held-out, {len(canaries)} canaries ({len(data['train'])} training "
        f"examples, {tokens} tokens per epoch)",
        flush=True,
    )
    # one ε per invocation is allowed (the shared lock's jobs stay short): the base model's scores and
    # every finished row are kept in --work and reused when the settings (all but --epsilons) agree
    settings = {k: v for k, v in vars(args).items() if k not in ("epsilons", "work", "report_only")}
    saved = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    same = saved.get("settings") == settings
    data["base"] = saved.get("base") if same else None
    rows = saved.get("rows", []) if same else []
    for epsilon in [] if args.report_only else [float(e) for e in args.epsilons.split(",")]:
        row = run_one(args, epsilon, data, spec, tokenizer.pad_token_id)
        if "base_scores" in row:
            data["base"] = row.pop("base_scores")
        row["summary"] = _summary(row["scores"], data["base"], canaries)
        rows = [r for r in rows if r["epsilon"] != epsilon] + [row]
        rows.sort(key=lambda r: -r["epsilon"])
        s = row["summary"]
        print(
            f"ε = {epsilon:g}: {row['steps']} steps in {row['train_s']:.0f} s "
            f"(scoring {row['score_s']:.0f} s), "
            f"AUC {s['auc']:.3f}, TPR@1% {s['tpr_at_1pct_fpr']:.3f}, exposure {s['exposure']}, "
            f"spent ε {row.get('spent_epsilon')}",
            flush=True,
        )
        (work / "results.json").write_text(
            json.dumps({"settings": settings, "base": data["base"], "rows": rows}, indent=1, default=str)
        )
    if not rows:
        raise SystemExit(f"{work / 'results.json'}: no rows with these settings")
    for row in rows:  # summaries again: JSON turned their integer keys into strings
        row["summary"] = _summary(row["scores"], data["base"], canaries)
    repeats = [int(r) for r in args.repeats.split(",")]
    base_summary = _summary(data["base"], data["base"], canaries)
    table = _table(rows, repeats)
    base_exposure = ", ".join(f"×{k}: {base_summary['exposure'][k]:.2f}" for k in repeats)
    print("\n" + table + f"\n\nbase model (no training) exposure: {base_exposure}")
    (work / "table.md").write_text(table + "\n")
    _plot(rows, repeats, work / "privacy_audit.png")
    print(f"results: {work / 'results.json'}, plot: {work / 'privacy_audit.png'}")


if __name__ == "__main__":
    main()
