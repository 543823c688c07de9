"""medmerge vs mergekit on two noisy copies of the embedded 135M model: wall time, peak RSS, agreement.

Every merge runs in its own subprocess (peak RSS from os.wait4's rusage of that child), medmerge and
mergekit alternating, in one run of this script. mergekit lives in its own venv (bench/setup_mergekit.sh);
it is never a dependency of medmerge.

    bash bench/setup_mergekit.sh            # once: $MEDMERGE_CACHE/venv-mergekit (default ~/.cache/medmerge)
    .venv/bin/python bench/merge_vs_mergekit.py [--work DIR]   # prints the table (DIR: default a temp folder)

Experts: θ_k = θ + σ·std(θ_tensor)·N(0, 1), seeded per expert (k = 1, 2), written once under --work.
Conventions compared (docs/merging.md): ties with mergekit's normalize: true is the same formula (up
to which of several equal |τ| at the trim threshold is kept); slerp and linear are the same; dare_ties
differs by design (mergekit draws masks from torch's global RNG and rescales to the L1 norm instead of
by 1/density, and by default sums instead of averaging the agreeing entries), so only the
fraction of entries kept is compared there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medmerge.merge.tensors import ShardWriter, folder_tensors, read_tensor
from medmerge.models import cache_dir

WEIGHTS = (1.0, 0.7)
DENSITY = 0.2
T = 0.3


def make_expert(base: Path, out: Path, seed: int, sigma: float) -> Path:
    """θ + σ·std(θ)·N(0,1) per floating tensor (seeded), streamed tensor by tensor."""
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    infos = folder_tensors(base)
    writer = ShardWriter(tmp, [(n, i.dtype, i.shape) for n, i in infos.items()], 1 << 40)
    generator = torch.Generator().manual_seed(seed)
    for name, info in infos.items():
        theta = read_tensor(info)
        if theta.is_floating_point() and theta.numel() > 1:
            theta = theta + sigma * theta.std() * torch.randn(theta.shape, generator=generator)
        writer.write(name, theta.to(info.dtype))
    writer.close()
    for file in base.iterdir():
        if file.suffix in (".json", ".jinja") and file.name not in ("medmerge-model.json",):
            shutil.copy2(file, tmp / file.name)
    tmp.rename(out)
    return out


def medmerge_config(method: str, base: Path, a: Path, b: Path) -> dict:
    models = [{"path": str(a), "weight": WEIGHTS[0]}, {"path": str(b), "weight": WEIGHTS[1]}]
    if method == "slerp":
        return {"method": "slerp", "models": [str(a), str(b)], "parameters": {"t": T}}
    if method == "linear":
        return {"method": "linear", "models": models}
    params = {"density": DENSITY} | ({"seed": 0} if method.startswith("dare") else {})
    return {"method": method, "base_model": str(base), "models": models, "parameters": params}


def mergekit_config(method: str, base: Path, a: Path, b: Path) -> dict:
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": str(a),
            "models": [{"model": str(a)}, {"model": str(b)}],
            "parameters": {"t": T},
            "dtype": "float32",
        }
    models = [
        {"model": str(p), "parameters": {"weight": w} | ({} if method == "linear" else {"density": DENSITY})}
        for p, w in zip((a, b), WEIGHTS, strict=True)
    ]
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": models,
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    shared = {"normalize": True}  # ties: mergekit's default; dare_ties: the disjoint mean, as in medmerge
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": shared,
        "dtype": "float32",
    }


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds user+system) of one subprocess, from os.wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def compare(x: Path, y: Path) -> str:
    """Max |a − b| over the tensors both outputs have, entries differing by > 1e-6, names in one only."""
    tx, ty = folder_tensors(x), folder_tensors(y)
    common = [n for n in tx if n in ty]
    worst, differing, total = 0.0, 0, 0
    for name in common:
        a, b = read_tensor(tx[name]).to(torch.float32), read_tensor(ty[name]).to(torch.float32)
        diff = (a - b).abs()
        worst = max(worst, float(diff.max()))
        differing += int(torch.count_nonzero(diff > 1e-6))
        total += diff.numel()
    odd = len(set(tx) ^ set(ty))
    text = f"max abs diff {worst:.1e}, {differing} of {total} entries differ > 1e-6"
    return text + (f", {odd} names in one only" if odd else "")


def kept_fraction(merged: Path, base: Path) -> float:
    """Fraction of entries where the merged model differs from the base (≈ kept by either expert)."""
    tm, tb = folder_tensors(merged), folder_tensors(base)
    changed = total = 0
    for name in tm:
        a, b = read_tensor(tm[name]), read_tensor(tb[name])
        changed += int((a != b).sum())
        total += a.numel()
    return changed / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="experts and outputs (default: a fresh temporary folder)")
    parser.add_argument(
        "--mergekit-venv", type=Path, help="default: $MEDMERGE_CACHE/venv-mergekit (bench/setup_mergekit.sh)"
    )
    parser.add_argument("--methods", nargs="+", default=["ties", "dare_ties", "slerp", "linear"])
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool and method; the fastest counts")
    parser.add_argument(
        "--sigma", type=float, default=0.02, help="expert noise, in units of each tensor's std"
    )
    args = parser.parse_args()
    args.mergekit_venv = args.mergekit_venv or cache_dir() / "venv-mergekit"
    args.work = args.work or Path(tempfile.mkdtemp(prefix="medmerge-bench-merge-"))
    print(f"work folder: {args.work}", flush=True)

    mergekit_yaml = args.mergekit_venv / "bin" / "mergekit-yaml"
    if not mergekit_yaml.is_file():
        sys.exit(f"{mergekit_yaml} not found: run bash bench/setup_mergekit.sh first")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["MEDMERGE_CACHE"] = env.get("MEDMERGE_CACHE") or str(Path.home() / ".cache" / "medmerge")
    os.environ["MEDMERGE_CACHE"] = env["MEDMERGE_CACHE"]
    from medmerge.models import resolve_model

    base = resolve_model("smollm2-135m")
    args.work.mkdir(parents=True, exist_ok=True)
    a = make_expert(base, args.work / "expert-a", seed=1, sigma=args.sigma)
    b = make_expert(base, args.work / "expert-b", seed=2, sigma=args.sigma)

    import yaml

    rows = []
    load_start = os.getloadavg()[0]
    for method in args.methods:
        cfg_m = args.work / f"{method}.medmerge.yaml"
        cfg_k = args.work / f"{method}.mergekit.yaml"
        cfg_m.write_text(yaml.safe_dump(medmerge_config(method, base, a, b)))
        cfg_k.write_text(yaml.safe_dump(mergekit_config(method, base, a, b)))
        out_m, out_k = args.work / f"out-{method}-medmerge", args.work / f"out-{method}-mergekit"
        cmd_m = [
            sys.executable,
            "-m",
            "medmerge.cli",
            "merge",
            str(cfg_m),
            "--out",
            str(out_m),
            "--overwrite",
            "--quiet",
        ]
        cmd_k = [str(mergekit_yaml), str(cfg_k), str(out_k), "--no-cuda", "--quiet", "--random-seed", "0"]
        runs: dict[str, list[tuple[float, float, float]]] = {"medmerge": [], "mergekit": []}
        for _ in range(args.repeats):
            for tool, cmd, out in (("mergekit", cmd_k, out_k), ("medmerge", cmd_m, out_m)):
                shutil.rmtree(out, ignore_errors=True)
                runs[tool].append(measure(cmd, env))
        if method == "dare_ties":
            agree = f"kept {kept_fraction(out_m, base):.3f} vs {kept_fraction(out_k, base):.3f} (RNG differs)"
        else:
            agree = compare(out_m, out_k)
        # fastest wall time, highest peak RSS, least CPU time over the repeats
        m = [min(r[0] for r in runs["medmerge"]), max(r[1] for r in runs["medmerge"])]
        k = [min(r[0] for r in runs["mergekit"]), max(r[1] for r in runs["mergekit"])]
        m.append(min(r[2] for r in runs["medmerge"]))
        k.append(min(r[2] for r in runs["mergekit"]))
        rows.append({"method": method, "medmerge": m, "mergekit": k, "outputs": agree})
        print(f"... {method}: medmerge {m}, mergekit {k} (wall s, peak MiB, CPU s)", flush=True)

    print()
    print(
        f"two noisy experts of smollm2-135m (σ={args.sigma}·std), fp32, best of {args.repeats}, "
        f"{os.cpu_count()} CPUs, load average {load_start:.1f} → {os.getloadavg()[0]:.1f}"
    )
    header = ["method", "wall s medmerge / mergekit", "×", "peak RSS MiB medmerge / mergekit", "×"]
    header += ["CPU s medmerge / mergekit", "×", "outputs"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        (tm, rm, cm), (tk, rk, ck) = row["medmerge"], row["mergekit"]
        print(
            f"| {row['method']} | {tm:.1f} / {tk:.1f} | {tm / tk:.2f} | {rm:.0f} / {rk:.0f} | {rm / rk:.2f} "
            f"| {cm:.1f} / {ck:.1f} | {cm / ck:.2f} | {row['outputs']} |"
        )
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
