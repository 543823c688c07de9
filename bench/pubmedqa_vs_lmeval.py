"""PubMedQA accuracy, medmerge vs lm-evaluation-harness, side by side in one run (same model, same data).

medmerge scores yes / no / maybe with `medmerge.evaluate.choices` (lm-eval's `pubmedqa` protocol: the
option with the highest summed log-likelihood after "Abstract: …\\nQuestion: …\\nAnswer:", no chat
template, not length-normalized). lm-eval 0.4.13 (its own venv: `bash bench/setup_lmeval.sh`) runs its
own `pubmedqa` task — included as is, so its `doc_to_text` and choices are lm-eval's code — on the same
questions, read from a JSONL converted here from the local `pubmedqa_ori_pqal.json`
(`dataset_path: json`), with `--model hf --model_args pretrained=<the embedded smollm2-135m folder>`.
Both run at the same time (one torch thread each by default) and the script prints both accuracies, the
questions on which the two predictions differ, and the largest log-likelihood difference.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/pubmedqa_vs_lmeval.py [--half test|all] [--limit N]
        [--lm-eval /tmp/lmeval/bin/lm_eval] [--threads 1] [--batch-size 8]

`--half test`: PubMedQA's official 500-question test set (rebuilt offline by the publisher's split
script, see medmerge.evaluate.choices); `--half cv`: the other 500 (its cross-validation half);
`--half all`: the labelled 1,000.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from medmerge.data import load_dataset
from medmerge.evaluate.choices import (
    PUBMEDQA_CHOICES,
    accuracy_per_item,
    choice_loglikelihoods,
    official_test_half,
    pubmedqa_context,
)
from medmerge.models import load_model, load_tokenizer, resolve_model

TASK = "pubmedqa_medmerge_local"


def _task_dir(root: Path, data: Path, lm_eval: str) -> Path:
    """A task YAML that includes lm-eval's own `pubmedqa` task and only swaps in the local JSONL."""
    where = "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"
    python = str(Path(lm_eval).parent / "python")
    site = subprocess.run([python, "-c", where], check=True, capture_output=True, text=True).stdout.strip()
    include = Path(site) / "tasks" / "pubmedqa" / "pubmedqa.yaml"
    folder = root / "tasks"
    folder.mkdir()
    (folder / f"{TASK}.yaml").write_text(
        f"include: {include}\n"
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n"
    )
    return folder


def _run_lm_eval(args: argparse.Namespace, model_dir: Path, docs: list[dict], root: Path) -> subprocess.Popen:
    data = root / "pubmedqa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = _task_dir(root, data, args.lm_eval)
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "HF_DATASETS_CACHE": str(root / "hf-datasets"),
    }
    cmd = [
        args.lm_eval, "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", TASK, "--include_path", str(tasks), "--device", "cpu",
        "--batch_size", str(args.batch_size), "--output_path", str(root / "out"), "--log_samples",
    ]  # fmt: skip
    log = open(root / "lm_eval.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _lm_eval_samples(root: Path) -> dict[str, dict]:
    """pubid → {acc, loglikelihoods} from lm-eval's --log_samples file."""
    [path] = glob.glob(str(root / "out" / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    out = {}
    for line in Path(path).read_text().splitlines():
        s = json.loads(line)
        lls = [float(r[0][0]) if isinstance(r[0], list) else float(r[0]) for r in s["resps"]]
        out[str(s["doc"]["pubid"])] = {"acc": float(s["acc"]), "ll": lls}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--half", choices=["test", "cv", "all"], default="test")
    parser.add_argument("--limit", type=int, default=None, help="first n questions of the half")
    parser.add_argument("--lm-eval", default="/tmp/lmeval/bin/lm_eval")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pairs = load_dataset("pubmedqa").pairs
    if args.half != "all":
        half = official_test_half(pairs)
        pairs = [p for p in pairs if (p.id in half) == (args.half == "test")]
    pairs = pairs[: args.limit] if args.limit else pairs
    docs = [
        {
            "pubid": p.id.split("/", 1)[1],
            "QUESTION": p.extra["QUESTION"],
            "CONTEXTS": p.extra["CONTEXTS"],
            "final_decision": p.extra["final_decision"],
        }
        for p in pairs
    ]
    model_dir = resolve_model("smollm2-135m")
    print(f"{len(pairs)} questions ({args.half}), model {model_dir}, {args.threads} thread(s) each")

    with tempfile.TemporaryDirectory(prefix="pubmedqa-lmeval-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        proc = _run_lm_eval(args, model_dir, docs, root)

        model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
        t0 = time.perf_counter()
        ours_ll = choice_loglikelihoods(
            model, tokenizer, "causal", [pubmedqa_context(p) for p in pairs], batch_size=args.batch_size
        )
        ours_s = time.perf_counter() - t0
        ours = accuracy_per_item(ours_ll, [p.extra["final_decision"] for p in pairs])

        rc = proc.wait()
        lm_s = time.perf_counter() - start
        if rc != 0:
            print((root / "lm_eval.log").read_text()[-4000:])
            raise SystemExit(f"lm_eval exited {rc}")
        theirs = _lm_eval_samples(root)

    ids = [d["pubid"] for d in docs]
    theirs_acc = [theirs[i]["acc"] for i in ids]
    diff_ll = max(
        abs(a - b)
        for i, row in zip(ids, ours_ll, strict=True)
        for a, b in zip(row, theirs[i]["ll"], strict=True)
    )
    differ = [i for i, a, b in zip(ids, ours, theirs_acc, strict=True) if a != b]
    pred = {
        i: PUBMEDQA_CHOICES[max(range(3), key=lambda j: (row[j], -j))]
        for i, row in zip(ids, ours_ll, strict=True)
    }
    counts = {c: sum(v == c for v in pred.values()) for c in PUBMEDQA_CHOICES}
    print()
    print("| scorer | PubMedQA accuracy | correct | seconds |")
    print("|---|---|---|---|")
    print(
        f"| medmerge (evaluate.choices) | {sum(ours) / len(ours):.4f} | "
        f"{int(sum(ours))}/{len(ours)} | {ours_s:.0f} |"
    )
    print(
        f"| lm-eval 0.4.13 `pubmedqa` acc | {sum(theirs_acc) / len(theirs_acc):.4f} | "
        f"{int(sum(theirs_acc))}/{len(theirs_acc)} | {lm_s:.0f} (wall, incl. load) |"
    )
    print()
    print(f"questions scored differently: {len(differ)} {differ[:10]}")
    print(f"largest |log-likelihood difference| over all options: {diff_ll:.2e} nats")
    print(f"medmerge's predictions: {counts}")
    print(f"first question, log p(yes/no/maybe): medmerge {ours_ll[0]}, lm-eval {theirs[ids[0]]['ll']}")


if __name__ == "__main__":
    main()
