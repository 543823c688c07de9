"""Edge benchmark: the same model under every CPU engine, side by side in one run.

For each variant (torch fp32, torch bf16, CTranslate2 float32 / int8_float32 / bfloat16 storage, GGUF q8_0 /
q4_0 on llama.cpp when llama-cpp-python is importable) a fresh worker process measures:

    size        bytes of the weight files on disk (MiB)
    load_s      engine construction (weights read, tokenizer, kernels ready), seconds
    ttft_s      time to first token for one question, warm engine, median of 3 (prompt pass + 1 step)
    tok_s_1     decode speed for one question: (tokens − 1) / (t_last − t_first), median of 3
    tok_s_8     batch of 8: generated tokens / wall seconds, over all quality batches (llama.cpp: the 8
                prompts one after the other; llama-cpp-python's high-level API decodes one sequence)
    *_cpu       the same rates per CPU-second of the worker (all its threads): robust on a shared machine
    rss_mib     peak resident memory of the worker (ru_maxrss)
    quality     ROUGE-L F and BERTScore F1 (medmerge.evaluate) of greedy answers to the first N MedQuAD
                test questions (max_new_tokens each), and the paired-bootstrap 95% interval of the
                ROUGE-L difference to torch fp32 on the same questions

Each worker runs alone (one process, its own threads), so an edge engine never competes with torch
threads. Usage (outputs under --out, default a fresh temporary folder; exports are made there once and
reused; --data is the MedQuAD zip or folder):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/edge.py --data PATH/MedQuAD-master.zip --out runs/edge-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    # name: (export format or None, quantization, engine)
    "torch-fp32": (None, None, "torch"),
    "torch-bf16": (None, None, "torch-bf16"),
    "ct2-float32": ("ct2", "float32", "ct2"),
    "ct2-int8_float32": ("ct2", "int8_float32", "ct2"),
    "ct2-bfloat16": ("ct2", "bfloat16", "ct2"),
    "gguf-q8_0-llama.cpp": ("gguf", "q8_0", "llama.cpp"),
    "gguf-q4_0-llama.cpp": ("gguf", "q4_0", "llama.cpp"),
}
SINGLE_QUESTION = "What are the symptoms of type 2 diabetes and how is it treated?"


def weight_mib(path: Path) -> float:
    files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    return sum(p.stat().st_size for p in files) / 2**20


# ------------------------------------------------------------------------------------------ worker


def worker(args: argparse.Namespace) -> None:
    """Measure one variant in this (fresh) process and write its JSON result."""
    from medmerge.export.engines import open_engine, prompt_ids

    questions = json.loads(Path(args.questions_file).read_text())
    t0 = time.perf_counter()
    engine = open_engine(args.model_path, args.engine, threads=args.threads)
    load_s = time.perf_counter() - t0

    prompt = prompt_ids(engine, SINGLE_QUESTION)
    ttfts, rates, cpu_rates, lengths = [], [], [], []
    for _ in range(4):  # first run warms caches and kernels; the next 3 are measured
        start = time.perf_counter()
        stamps = [
            (time.perf_counter(), time.process_time()) for _ in engine.stream_ids(prompt, args.max_new_tokens)
        ]
        ttfts.append(stamps[0][0] - start)
        n = len(stamps) - 1
        rates.append(n / (stamps[-1][0] - stamps[0][0]) if n else float("nan"))
        cpu_rates.append(n / max(stamps[-1][1] - stamps[0][1], 1e-9) if n else float("nan"))
        lengths.append(len(stamps))

    prompts = [prompt_ids(engine, q) for q in questions]
    answers, generated, batch_seconds, batch_cpu = [], 0, 0.0, 0.0
    for i in range(0, len(prompts), 8):
        start, cpu = time.perf_counter(), time.process_time()
        outs = engine.generate_batch(prompts[i : i + 8], args.max_new_tokens)
        batch_seconds += time.perf_counter() - start
        batch_cpu += time.process_time() - cpu
        generated += sum(len(o) for o in outs)
        answers += [engine.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    result = {
        "engine": engine.name,
        "load_s": load_s,
        "ttft_s": statistics.median(ttfts[1:]),
        "tok_s_1": statistics.median(rates[1:]),
        "tok_cpu_s_1": statistics.median(cpu_rates[1:]),
        "single_tokens": lengths[1:],
        "tok_s_8": generated / batch_seconds,
        "tok_cpu_s_8": generated / batch_cpu,
        "batch_tokens": generated,
        "batch_seconds": batch_seconds,
        "batch_cpu_seconds": batch_cpu,
        "loadavg_1m": os.getloadavg()[0],
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "answers": answers,
    }
    Path(args.result).write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------ parent


def ensure_exports(model_dir: Path, exports: Path, variants: list[str]) -> dict[str, Path]:
    """Folder each variant runs from; missing exports are made (and agreement-checked) once."""
    from medmerge.export.exporter import export_model

    folders = {}
    for name in variants:
        fmt, quant, _ = VARIANTS[name]
        if fmt is None:
            folders[name] = model_dir
            continue
        folder = exports / f"{fmt}-{quant}"
        if not (folder / "medmerge-export.json").is_file():
            print(f"exporting {fmt} {quant} → {folder}", flush=True)
            export_model(str(model_dir), fmt, folder, quantization=quant)
        folders[name] = folder
    return folders


def run_variant(name: str, folder: Path, args: argparse.Namespace, qfile: Path) -> dict:
    result = args.out / f"worker-{name}.json"
    cmd = [
        sys.executable, __file__, "--worker", "--engine", VARIANTS[name][2], "--model-path", str(folder),
        "--questions-file", str(qfile), "--result", str(result), "--threads", str(args.threads),
        "--max-new-tokens", str(args.max_new_tokens),
    ]  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {name} …", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0]}
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", help="MedQuAD zip or folder (the questions); required unless --worker")
    parser.add_argument("--out", type=Path, help="results folder (default: a fresh temporary folder)")
    parser.add_argument("--exports", type=Path, help="folder of exports to reuse (default: OUT/exports)")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--questions-file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from medmerge.data import load_split
    from medmerge.export.common import llama_cpp_available
    from medmerge.models import resolve_model

    if not args.data:
        parser.error("--data PATH (the MedQuAD zip or folder) is required")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="medmerge-bench-edge-"))
    print(f"outputs: {args.out}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = load_split(f"medquad:{args.data}", "test", seed=0, limit=args.questions)
    qfile = args.out / "questions.json"
    qfile.write_text(json.dumps([p.question for p in pairs]))
    references = [p.answer for p in pairs]
    model_dir = resolve_model(args.model)
    variants = [v for v in args.variants if VARIANTS[v][2] != "llama.cpp" or llama_cpp_available()]
    skipped = {v: "llama-cpp-python not installed" for v in args.variants if v not in variants}
    folders = ensure_exports(model_dir, args.exports or args.out / "exports", variants)

    results = {}
    for name in variants:
        r = run_variant(name, folders[name], args, qfile)
        r["size_mib"] = weight_mib(folders[name])
        results[name] = r
        print(f"  {json.dumps({k: v for k, v in r.items() if k != 'answers'})}", flush=True)
    score(results, references)
    report(results, skipped, args)


def score(results: dict, references: list[str]) -> None:
    from medmerge.evaluate.bertscore import bertscore
    from medmerge.evaluate.metrics import rouge_scores
    from medmerge.evaluate.stats import paired_bootstrap

    base = results.get("torch-fp32", {}).get("answers")
    base_rouge = rouge_scores(base, references)["rougeL"] if base else None
    for r in results.values():
        if "answers" not in r:
            continue
        rouge = rouge_scores(r["answers"], references)["rougeL"]
        r["rougeL"] = 100 * statistics.mean(rouge)
        r["bertscore_f1"] = 100 * statistics.mean(bertscore(r["answers"], references)["f1"])
        if base_rouge:
            test = paired_bootstrap(rouge, base_rouge, seed=0)
            r["rougeL_vs_fp32"] = {
                k: 100 * v if k in ("diff", "low", "high") else v for k, v in test.as_dict().items()
            }


def report(results: dict, skipped: dict, args: argparse.Namespace) -> None:
    ok = [r for r in results.values() if "error" not in r]
    base = results.get("torch-fp32") if "error" not in results.get("torch-fp32", {"error": 1}) else ok[0]
    header = (
        "| variant | engine | size MiB | × fp32 size | load s | TTFT s | tok/s (1) | × fp32 "
        "| tok/s (batch 8) | × fp32 | tok/CPU-s (1) | × fp32 | tok/CPU-s (8) | × fp32 | peak RSS MiB "
        "| ROUGE-L | Δ vs fp32 [95% CI] | BERTScore F1 |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        d = r.get("rougeL_vs_fp32", {})
        delta = f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else ""
        lines.append(
            f"| {name} | {r['engine']} | {r['size_mib']:.0f} | {r['size_mib'] / base['size_mib']:.2f} "
            f"| {r['load_s']:.1f} | {r['ttft_s']:.3f} | {r['tok_s_1']:.1f} "
            f"| {r['tok_s_1'] / base['tok_s_1']:.2f} "
            f"| {r['tok_s_8']:.1f} | {r['tok_s_8'] / base['tok_s_8']:.2f} "
            f"| {r['tok_cpu_s_1']:.1f} | {r['tok_cpu_s_1'] / base['tok_cpu_s_1']:.2f} "
            f"| {r['tok_cpu_s_8']:.1f} | {r['tok_cpu_s_8'] / base['tok_cpu_s_8']:.2f} | {r['rss_mib']:.0f} "
            f"| {r['rougeL']:.2f} | {delta} | {r['bertscore_f1']:.2f} |"
        )
    for name, why in skipped.items():
        lines.append(f"| {name} | unavailable: {why} |")
    table = "\n".join(lines)
    meta = (
        f"model {args.model}; {args.questions} MedQuAD test questions (seed-0 split), greedy, max_new_tokens "
        f"{args.max_new_tokens}; {args.threads} threads per engine; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
        f"1-min load average during the workers: "
        + ", ".join(f"{n} {r.get('loadavg_1m', float('nan')):.1f}" for n, r in results.items())
    )
    print("\n" + meta + "\n\n" + table)
    (args.out / "table.md").write_text(meta + "\n\n" + table + "\n")
    slim = {n: {k: v for k, v in r.items() if k != "answers"} for n, r in results.items()}
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "results": slim, "skipped": skipped}, indent=1)
    )
    (args.out / "answers.json").write_text(
        json.dumps({n: r.get("answers") for n, r in results.items()}, indent=1)
    )
    plot(results, args.out / "edge.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in results.items() if "error" not in r}
    names = list(ok)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, key, title in zip(
        axes,
        ("tok_s_1", "tok_s_8", "size_mib", "rougeL"),
        ("tokens/s, one question", "tokens/s, batch of 8", "weights on disk (MiB)", "ROUGE-L F (×100)"),
        strict=True,
    ):
        ax.barh(names, [ok[n][key] for n in names], color="tab:blue")
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
