"""Training throughput: medmerge's loop against the Hugging Face Trainer, side by side, in one run.

Same model (the embedded smollm2-135m), same real MedQuAD training questions (encoded once, prompt masked),
same micro-batch size, same LoRA settings (r, alpha, dropout, all linear layers), same NF4 base for qlora,
same AdamW / warm-up / cosine / clipping, same bf16 autocast setting, same dynamic padding with
length-grouped batches, same thread count. Each (loop, method) runs in its own subprocess so that its
peak RSS (getrusage ru_maxrss: model load included) is its own.

tokens/s = non-padding tokens of the timed optimizer steps / their wall-clock seconds (the first
`--warmup` steps are not timed). Run:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py --data MedQuAD-master.zip --steps 6 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _config(args: argparse.Namespace, method: str, base_dtype: str = "auto", dropout_rng: str = "counter"):
    from medmerge.config import TrainConfig, validate_config

    return validate_config(
        {
            "model": "smollm2-135m",
            "method": method,
            "data": {
                "specs": [f"medquad:{args.data}"],
                "max_examples": args.batch_size * (args.steps + args.warmup) * 4,
            },
            "batch_size": args.batch_size,
            "learning_rate": 2e-4,
            "warmup_steps": 2,
            "max_steps": args.steps + args.warmup,
            "max_prompt_tokens": args.max_tokens,
            "max_answer_tokens": args.max_tokens,
            "eval_examples": 8,
            "autocast": args.autocast,
            "threads": args.threads,
            "base_dtype": base_dtype,
            "dropout_rng": dropout_rng,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        },
        TrainConfig,
        "bench",
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_medmerge(args: argparse.Namespace, method: str) -> dict:
    import torch

    from medmerge.models import load_tokenizer, resolve_model
    from medmerge.train.examples import prepare_data
    from medmerge.train.loop import Trainer
    from medmerge.train.model import build_model
    from medmerge.train.precision import Runtime, reuse_freed_memory, use_bf16_autocast

    config = _config(args, method)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(resolve_model(config.model))
    data = prepare_data(config, tokenizer, "causal")
    torch.manual_seed(config.seed)
    device = torch.device("cpu")
    model, kind, _ = build_model(config, device)
    bf16 = use_bf16_autocast(config.autocast, device)
    trainer = Trainer(
        config, model, kind, data.train, data.validation, tokenizer.pad_token_id, Runtime(0, 1, device), bf16
    )
    tokens, seconds = 0, 0.0
    with reuse_freed_memory():  # as medmerge.train.train_expert runs its loop
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            _, n = trainer.step()
            if step >= args.warmup:
                seconds += time.perf_counter() - start
                tokens += n
    base = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
    return {"tokens": tokens, "seconds": seconds, "bf16": bf16, "frozen_dtypes": sorted(base)}


def worker_trainer(args: argparse.Namespace, method: str) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from medmerge.models import load_tokenizer, resolve_model
    from medmerge.train.examples import prepare_data
    from medmerge.train.model import build_model
    from medmerge.train.precision import use_bf16_autocast

    config = _config(args, method, args.hf_base_dtype, dropout_rng="torch")
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(resolve_model(config.model))
    data = prepare_data(config, tokenizer, "causal")
    torch.manual_seed(config.seed)
    # the same PEFT / NF4 model as medmerge's, as PEFT builds it: nn.Dropout, frozen base in --hf-base-dtype
    # (default float32: the documented PEFT + Trainer recipe, model loaded in float32 and
    # TrainingArguments(bf16=True) = autocast); glibc's allocator left at its defaults
    model, _, _ = build_model(config, torch.device("cpu"))
    bf16 = use_bf16_autocast(config.autocast, torch.device("cpu"))
    train = [{**e, "attention_mask": [1] * len(e["input_ids"])} for e in data.train]
    clock = {"tokens": 0, "seconds": 0.0, "step": 0, "start": 0.0}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            if clock["step"] >= args.warmup:
                clock["seconds"] += time.perf_counter() - clock["start"]
            clock["step"] += 1

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kw):
            if clock["step"] >= args.warmup:
                clock["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *rest, **kw)

    targs = TrainingArguments(
        output_dir=os.path.join(args.scratch, f"hf-{method}"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=config.max_grad_norm,
        max_steps=args.warmup + args.steps,
        bf16=bf16,
        use_cpu=True,
        group_by_length=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=config.seed,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    CountingTrainer(
        model=model, args=targs, train_dataset=train, data_collator=collator, callbacks=[Timer()]
    ).train()
    base = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
    return {
        "tokens": clock["tokens"],
        "seconds": clock["seconds"],
        "bf16": bf16,
        "frozen_dtypes": sorted(base),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128, help="prompt and answer token caps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"])
    parser.add_argument("--data", required=True, help="MedQuAD zip or folder")
    parser.add_argument(
        "--hf-base-dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16"],
        help="frozen-base dtype of the Trainer's model (medmerge's uses its default, auto)",
    )
    parser.add_argument("--scratch", help="the Trainer's output folder (default: a fresh temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("LOOP", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        loop, method = args.worker
        result = (worker_medmerge if loop == "medmerge" else worker_trainer)(args, method)
        result["peak_rss_mb"] = _peak_rss_mb()
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="medmerge-bench-train-")
    rows = []
    passthrough = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch-size={args.batch_size}",
        f"--max-tokens={args.max_tokens}",
        f"--threads={args.threads}",
        f"--autocast={args.autocast}",
        f"--data={args.data}",
        f"--hf-base-dtype={args.hf_base_dtype}",
        f"--scratch={args.scratch}",
    ]
    for method in args.methods:
        for loop in ("medmerge", "hf-trainer"):
            cmd = [sys.executable, __file__, *passthrough, "--worker", loop, method]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode or line is None:
                sys.exit(f"{loop} {method} failed:\n{done.stderr[-3000:]}")
            result = json.loads(line[7:])
            result.update(loop=loop, method=method, tokens_per_s=result["tokens"] / result["seconds"])
            rows.append(result)
            speed, rss = result["tokens_per_s"], result["peak_rss_mb"]
            dtypes = "/".join(result["frozen_dtypes"])
            print(
                f"  {loop:10s} {method:6s} {speed:8.1f} tok/s  peak RSS {rss:7.0f} MB  frozen {dtypes}",
                flush=True,
            )
    print(
        f"\nmodel smollm2-135m, MedQuAD train, batch {args.batch_size}, "
        f"prompt/answer ≤ {args.max_tokens} tokens, "
        f"{args.steps} timed steps after {args.warmup}, {args.threads} threads, autocast {args.autocast} "
        f"(bf16={rows[0]['bf16']}), load average {os.getloadavg()[0]:.2f} at the end\n"
        "medmerge: medmerge.train.loop.Trainer.step, TrainConfig base_dtype auto (frozen base Linears in\n"
        "  bfloat16 under bf16 autocast, LoRA A/B float32), answer-only head with the fused chunked\n"
        "  cross-entropy, counter-based LoRA dropout, glibc keeping freed memory, fused AdamW.\n"
        f"Trainer: transformers Trainer, same PEFT model (nn.Dropout), frozen base in {args.hf_base_dtype},\n"
        "  TrainingArguments(bf16=<autocast>, group_by_length=True, use_cpu=True), DataCollatorForSeq2Seq.\n"
    )
    print(
        "| method | medmerge tok/s | Trainer tok/s | speed-up | medmerge peak RSS MB | Trainer peak RSS MB |"
    )
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        mm, hf = (
            next(r for r in rows if r["loop"] == loop and r["method"] == method)
            for loop in ("medmerge", "hf-trainer")
        )
        ratio = mm["tokens_per_s"] / hf["tokens_per_s"]
        print(
            f"| {method} | {mm['tokens_per_s']:.1f} | {hf['tokens_per_s']:.1f} | {ratio:.2f}× "
            f"| {mm['peak_rss_mb']:.0f} | {hf['peak_rss_mb']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
