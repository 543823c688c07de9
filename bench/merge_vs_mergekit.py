"""medmerge vs mergekit on two noisy copies of a 135M and a 360M Llama: wall time, peak RSS, agreement.

Every merge runs in its own subprocess (peak RSS from os.wait4's rusage of that child, started by a bare
interpreter so that this script's own memory does not count: see `measure`), medmerge and
mergekit alternating, in one run of this script. mergekit lives in its own venv (bench/setup_mergekit.sh);
it is never a dependency of medmerge.

    bash bench/setup_mergekit.sh            # once: $MEDMERGE_CACHE/venv-mergekit (default ~/.cache/medmerge)
    .venv/bin/python bench/merge_vs_mergekit.py [--size {135m,360m,both}] [--work DIR]   # prints the tables

Sizes: `135m` is the embedded SmolLM2-135M; `360m` is a Llama of SmolLM2-360M's shape (hidden 960,
32 layers, 15 heads, 5 KV heads, intermediate 2560, vocab 49152, tied embeddings, 362M parameters)
with random weights (N(0, 0.02) matrices, norms 1 + N(0, 0.01), seeded), float32 like the 135M, written
under --work with the 135M's tokenizer files (the SmolLM2 models share their tokenizer); start-up costs
weigh less there. Experts: θ_k = θ + σ·std(θ_tensor)·N(0, 1), seeded per expert (k = 1, 2), written
once under --work/SIZE.

Shared methods (every method both tools have): medmerge must take at most 0.5× mergekit's wall time and
0.5× its peak RSS; each ratio is printed with ok / FAIL. Conventions compared (docs/merging.md): ties,
breadcrumbs_ties with mergekit's normalize: true are the same formula (up to which of several equal |τ|
at the trim threshold is kept); linear, slerp, task_arithmetic, breadcrumbs, model_stock, karcher are
the same; dare_* and della* differ by design (mergekit draws masks from torch's global RNG and rescales
to the L1 norm instead of by the keep probability), so only the fraction of entries kept is compared.

Methods mergekit lacks (regmean, fisher, knots, core_space, tsv, iso_c, iso_cts) are timed against
medmerge's own linear merge of the same inputs: tsv / iso_c / iso_cts on the two experts; regmean /
fisher on the same experts with random site statistics in medmerge's format (medmerge.site_stats:
Gram matrices of every Linear's input, q/k/v and gate/up sharing one as `medmerge stats` stores them, and
diagonal Fishers of every Linear weight); knots / core_space on two random LoRA adapters (r = 16,
alpha 32, every Linear, as `medmerge train` makes them). Weights and statistics are random: these rows
measure time and memory only. They run --new-repeats times (default 1: a TSV or KnOTS merge of the 360M
takes minutes); merged folders are deleted once measured and compared, unless --keep-outputs.
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
from medmerge.models import cache_root

WEIGHTS = (1.0, 0.7)
DENSITY = 0.2
GAMMA = 0.01  # breadcrumbs
EPSILON = 0.1  # della
T = 0.3
LIMIT = 0.5  # medmerge / mergekit, wall time and peak RSS, for every shared method
SHARED = [
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "karcher",
]
RANDOM_MASKS = {"dare_linear", "dare_ties", "della", "della_linear"}
NEW = ["regmean", "fisher", "knots", "core_space", "tsv", "iso_c", "iso_cts"]
INPUTS = {  # what each new method merges; its time and memory are relative to linear on the same inputs
    "regmean": "statistics",
    "fisher": "statistics",
    "knots": "adapters",
    "core_space": "adapters",
    "tsv": "experts",
    "iso_c": "experts",
    "iso_cts": "experts",
}
SIZES = {  # random Llamas: config.json of the 135M with these keys replaced
    "360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "head_dim": 64,
    },
    # smoke test of this script only (not a benchmark): `--size tiny`
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------- inputs
def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a tied-embedding LlamaForCausalLM, in Hugging Face's order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = head * config["num_attention_heads"], head * config["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_base(reference: Path, out: Path, size: str) -> Path:
    """A Llama of SIZES[size]'s shape with seeded random float32 weights, streamed tensor by tensor, with
    the reference (135M) folder's tokenizer and generation files."""
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((reference / "config.json").read_text())
    config.pop("_model_name_or_path", None)
    config |= SIZES[size] | {"tie_word_embeddings": True, "vocab_size": 49152}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (reference / name).is_file():
            shutil.copy2(reference / name, tmp / name)
    shapes = llama_shapes(config)
    writer = ShardWriter(tmp, [(n, torch.float32, s) for n, s in shapes.items()], 1 << 40)
    generator = torch.Generator().manual_seed(360)
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        writer.write(name, 1 + 0.01 * noise if len(shape) == 1 else 0.02 * noise)
    writer.close()
    tmp.rename(out)
    return out


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


def linear_modules(base: Path) -> dict[str, tuple[int, ...]]:
    """name → shape of every decoder Linear weight (what site statistics and LoRA adapters cover)."""
    return {
        n: tuple(i.shape)
        for n, i in folder_tensors(base).items()
        if len(i.shape) == 2 and n.startswith("model.layers.")
    }


def with_statistics(expert: Path, out: Path, seed: int) -> Path:
    """`expert`'s weights (linked) with random site statistics in medmerge's format: a Gram (float32,
    (in, in), symmetric positive definite) per Linear input — q/k/v and gate/up share theirs through
    `aliases`, as `medmerge stats` stores them — and a diagonal Fisher per Linear weight."""
    from medmerge.site_stats import has_statistics, write_statistics

    if has_statistics(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for file in expert.iterdir():
        target = out / file.name
        if not target.exists():
            target.symlink_to(file.resolve())
    generator = torch.Generator().manual_seed(seed)
    grams, fishers, aliases = {}, {}, {}
    for name, shape in linear_modules(expert).items():
        owner = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        if owner != name:
            aliases[name] = owner
        elif name not in grams:
            x = torch.randn(256, shape[1], generator=generator)
            grams[name] = x.T @ x / 256 + 0.1 * torch.eye(shape[1])
        fishers[name] = (0.01 * torch.randn(shape, generator=generator)) ** 2
    info = {"examples": 256, "tokens": 256, "data": "random (bench/merge_vs_mergekit.py)"}
    write_statistics(out, grams, fishers, info, aliases=aliases)
    return out


def make_adapter(base: Path, out: Path, seed: int, r: int = 16, alpha: float = 32.0) -> Path:
    """A PEFT LoRA adapter on `base` (every decoder Linear, rank r) with random A and B, as safetensors."""
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, cols) in linear_modules(base).items():
        module = name.removesuffix(".weight")
        a = torch.randn(r, cols, generator=generator) / cols**0.5
        b = 0.01 * torch.randn(rows, r, generator=generator)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_file(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------- configs
def medmerge_config(method: str, base: Path, a: Path, b: Path) -> dict:
    models = [{"path": str(a), "weight": WEIGHTS[0]}, {"path": str(b), "weight": WEIGHTS[1]}]
    if method == "slerp":
        return {"method": "slerp", "models": [str(a), str(b)], "parameters": {"t": T}}
    if method == "linear":
        return {"method": "linear", "models": models}
    if method == "karcher":
        return {"method": "karcher", "models": [str(a), str(b)]}
    if method == "model_stock":
        return {"method": "model_stock", "base_model": str(base), "models": [str(a), str(b)]}
    params: dict = {} if method == "task_arithmetic" else {"density": DENSITY}
    params |= {"gamma": GAMMA} if method.startswith("breadcrumbs") else {}
    params |= {"epsilon": EPSILON} if method.startswith("della") else {}
    params |= {"seed": 0} if method in RANDOM_MASKS else {}
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
    if method in ("karcher", "model_stock"):
        return {
            "merge_method": method,
            "models": [{"model": str(a)}, {"model": str(b)}],
            "dtype": "float32",
        } | ({"base_model": str(base)} if method == "model_stock" else {})
    per_model: dict = {} if method in ("linear", "task_arithmetic") else {"density": DENSITY}
    per_model |= {"gamma": GAMMA} if method.startswith("breadcrumbs") else {}
    per_model |= {"epsilon": EPSILON} if method.startswith("della") else {}
    models = [
        {"model": str(p), "parameters": {"weight": w} | per_model}
        for p, w in zip((a, b), WEIGHTS, strict=True)
    ]
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": models,
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    # with sign consensus, normalize: true is the disjoint mean medmerge computes (mergekit's default is
    # true for ties and della, false for dare_ties and breadcrumbs_ties); without, both default to false
    consensus = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": {"normalize": consensus},
        "dtype": "float32",
    }


# ------------------------------------------------------------------------------------------ measuring
# A child's ru_maxrss starts from its parent's RSS at exec (Linux copies the old mm's high-water mark),
# so a command started straight from this script, which holds the experts' statistics, would read at
# least this script's RSS. A bare interpreter (about 10 MiB) starts each command and reports its rusage.
TRAMPOLINE = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvpe(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
report = [time.perf_counter() - start, usage.ru_maxrss, usage.ru_utime + usage.ru_stime]
os.write(int(sys.argv[1]), json.dumps(report).encode())
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], env: dict[str, str], settle: float) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds user+system) of one subprocess, from os.wait4 in a bare
    interpreter that starts it (TRAMPOLINE); its report comes back through a pipe.

    Before it, outside the timing: dirty pages of the runs before (gigabytes of merged weights) are
    flushed, so that neither tool pays for the other's write-back; then `settle` seconds pass, so that
    every run starts from the same memory state whichever tool freed gigabytes just before (a virtual
    machine with free page reporting, like the one the README's numbers come from, hands freed memory
    back to its host about 2 s after it is freed, and a page touched after that costs a host fault; a
    run started at once would get the previous run's pages back cheaply or not, by chance)."""
    os.sync()  # start clean: no other run's output still waiting to be written back while this one runs
    time.sleep(settle)
    read, write = os.pipe()
    os.set_inheritable(write, True)
    argv = [sys.executable, "-S", "-c", TRAMPOLINE, str(write), *cmd]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write,)
    )
    os.close(write)
    err = proc.stderr.read().decode(errors="replace")
    proc.wait()
    report = os.read(read, 4096)
    os.close(read)
    if proc.returncode != 0 or not report:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    wall, maxrss_kib, cpu = json.loads(report)
    return wall, maxrss_kib / 1024, cpu


def best(runs: list[tuple[float, float, float]]) -> list[float]:
    """Fastest wall time, highest peak RSS, least CPU time over the repeats."""
    return [min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)]


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


class Bench:
    """One size's inputs, commands and results."""

    def __init__(self, args: argparse.Namespace, size: str, base: Path, env: dict[str, str]) -> None:
        self.args, self.size, self.base, self.env = args, size, base, env
        self.work = args.work / size
        self.work.mkdir(parents=True, exist_ok=True)
        self.a = make_expert(base, self.work / "expert-a", seed=1, sigma=args.sigma)
        self.b = make_expert(base, self.work / "expert-b", seed=2, sigma=args.sigma)
        self.params = sum(_numel(i.shape) for i in folder_tensors(base).values())
        self.shared: list[dict] = []
        self.new: list[dict] = []

    def medmerge_cmd(self, config: dict, name: str) -> tuple[list[str], Path]:
        import yaml

        path, out = self.work / f"{name}.medmerge.yaml", self.work / f"out-{name}-medmerge"
        path.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "medmerge.cli", "merge", str(path), "--out", str(out), "--overwrite"]
        return cmd + ["--quiet"], out

    def run_shared(self, method: str) -> None:
        import yaml

        cfg_k = self.work / f"{method}.mergekit.yaml"
        cfg_k.write_text(yaml.safe_dump(mergekit_config(method, self.base, self.a, self.b)))
        cmd_m, out_m = self.medmerge_cmd(medmerge_config(method, self.base, self.a, self.b), method)
        out_k = self.work / f"out-{method}-mergekit"
        mergekit_yaml = self.args.mergekit_venv / "bin" / "mergekit-yaml"
        cmd_k = [str(mergekit_yaml), str(cfg_k), str(out_k), "--no-cuda", "--quiet", "--random-seed", "0"]
        runs: dict[str, list[tuple[float, float, float]]] = {"medmerge": [], "mergekit": []}
        for _ in range(self.args.repeats):
            for tool, cmd, out in (("mergekit", cmd_k, out_k), ("medmerge", cmd_m, out_m)):
                shutil.rmtree(out, ignore_errors=True)
                runs[tool].append(measure(cmd, self.env, self.args.settle))
        if method in RANDOM_MASKS:
            kept = kept_fraction(out_m, self.base), kept_fraction(out_k, self.base)
            agree = f"kept {kept[0]:.3f} vs {kept[1]:.3f} (RNG differs)"
        else:
            agree = compare(out_m, out_k)
        m, k = best(runs["medmerge"]), best(runs["mergekit"])
        self.shared.append({"method": method, "medmerge": m, "mergekit": k, "outputs": agree})
        print(f"... {self.size} {method}: medmerge {m}, mergekit {k} (wall s, peak MiB, CPU s)", flush=True)
        if not self.args.keep_outputs:
            shutil.rmtree(out_m, ignore_errors=True)
            shutil.rmtree(out_k, ignore_errors=True)

    def run_new(self, methods: list[str]) -> None:
        kinds = sorted({INPUTS[m] for m in methods})
        inputs: dict[str, tuple[Path, Path]] = {}
        if "experts" in kinds:
            inputs["experts"] = (self.a, self.b)
        if "statistics" in kinds:
            sa = with_statistics(self.a, self.work / "expert-a-stats", seed=11)
            inputs["statistics"] = (sa, with_statistics(self.b, self.work / "expert-b-stats", seed=12))
        if "adapters" in kinds:
            aa = make_adapter(self.base, self.work / "adapter-a", seed=21)
            inputs["adapters"] = (aa, make_adapter(self.base, self.work / "adapter-b", seed=22))
        baseline: dict[str, list[float]] = {}
        for kind in kinds:  # linear on the same inputs (statistics folders: the experts' own weights)
            baseline[kind] = self.time_medmerge("linear", kind, inputs[kind], {})
        for method in methods:
            seconds = self.time_medmerge(method, INPUTS[method], inputs[INPUTS[method]], {})
            kind = INPUTS[method]
            self.new.append({"method": method, "inputs": kind, "medmerge": seconds, "linear": baseline[kind]})

    def time_medmerge(self, method: str, kind: str, pair: tuple[Path, Path], parameters: dict) -> list[float]:
        config = {
            "method": method,
            "base_model": str(self.base),
            "models": [{"path": str(p), "weight": w} for p, w in zip(pair, WEIGHTS, strict=True)],
            "parameters": parameters,
        }
        cmd, out = self.medmerge_cmd(config, f"{method}-{kind}")
        runs = []
        for _ in range(self.args.new_repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(measure(cmd, self.env, self.args.settle))
        shutil.rmtree(out, ignore_errors=True)
        result = best(runs)
        print(f"... {self.size} {method} ({kind}): medmerge {result} (wall s, peak MiB, CPU s)", flush=True)
        return result

    def report(self, load: tuple[float, float]) -> None:
        print()
        origin = "embedded smollm2-135m" if self.size == "135m" else "random weights"
        print(
            f"## {self.size}: two noisy experts of a {self.params / 1e6:.1f}M-parameter Llama ({origin}, "
            f"σ={self.args.sigma}·std), fp32, best of {self.args.repeats}, {os.cpu_count()} CPUs, "
            f"load average {load[0]:.1f} → {load[1]:.1f}"
        )
        if self.shared:
            header = ["method", "wall s medmerge / mergekit", "×", f"≤ {LIMIT}×"]
            header += [
                "peak RSS MiB medmerge / mergekit",
                "×",
                f"≤ {LIMIT}×",
                "CPU s medmerge / mergekit",
                "×",
            ]
            print("| " + " | ".join(header + ["outputs"]) + " |")
            print("|" + "---|" * (len(header) + 1))
            for row in self.shared:
                (tm, rm, cm), (tk, rk, ck) = row["medmerge"], row["mergekit"]
                print(
                    f"| {row['method']} | {tm:.1f} / {tk:.1f} | {tm / tk:.2f} | {verdict(tm / tk)} "
                    f"| {rm:.0f} / {rk:.0f} | {rm / rk:.2f} | {verdict(rm / rk)} "
                    f"| {cm:.1f} / {ck:.1f} | {cm / ck:.2f} | {row['outputs']} |"
                )
            failed = [r["method"] for r in self.shared if not passes(r)]
            print(
                f"shared methods within {LIMIT}× of mergekit's wall time and peak RSS: "
                f"{len(self.shared) - len(failed)} of {len(self.shared)}"
                + (f" (not: {', '.join(failed)})" if failed else "")
            )
        if self.new:
            print()
            print(f"methods mergekit lacks, best of {self.args.new_repeats}, vs linear on the same inputs:")
            print(
                "| method (not in mergekit) | inputs | wall s | × linear | peak RSS MiB | × linear | CPU s |"
            )
            print("|---|---|---|---|---|---|---|")
            for row in self.new:
                (t, r, c), (tl, rl, _) = row["medmerge"], row["linear"]
                print(
                    f"| {row['method']} | {DESCRIBE[row['inputs']]} | {t:.1f} | {t / tl:.2f} "
                    f"| {r:.0f} | {r / rl:.2f} | {c:.1f} |"
                )
            for kind in sorted({row["inputs"] for row in self.new}):
                t, r, c = next(row["linear"] for row in self.new if row["inputs"] == kind)
                print(f"linear on the {DESCRIBE[kind]}: {t:.1f} s wall, {r:.0f} MiB peak RSS, {c:.1f} CPU s")


DESCRIBE = {
    "experts": "2 experts",
    "statistics": "2 experts + statistics",
    "adapters": "2 LoRA adapters r=16",
}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def verdict(ratio: float) -> str:
    return "ok" if ratio <= LIMIT else "FAIL"


def passes(row: dict) -> bool:
    (tm, rm, _), (tk, rk, _) = row["medmerge"], row["mergekit"]
    return tm / tk <= LIMIT and rm / rk <= LIMIT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size",
        choices=["135m", "360m", "both", "tiny"],
        default="both",
        metavar="{135m,360m,both}",
        help="model size(s) to benchmark (default both)",
    )
    parser.add_argument("--work", type=Path, help="experts and outputs (default: a fresh temporary folder)")
    parser.add_argument(
        "--mergekit-venv", type=Path, help="default: $MEDMERGE_CACHE/venv-mergekit (bench/setup_mergekit.sh)"
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=SHARED,
        choices=SHARED,
        metavar="METHOD",
        help=f"methods both tools have, timed against mergekit (default: all: {' '.join(SHARED)})",
    )
    parser.add_argument(
        "--new-methods",
        nargs="*",
        default=NEW,
        choices=NEW,
        metavar="METHOD",
        help=f"methods mergekit lacks, timed against medmerge's linear (default: all: {' '.join(NEW)})",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool and method; the fastest counts")
    parser.add_argument(
        "--new-repeats", type=int, default=1, help="runs of each method mergekit lacks (and of its linear)"
    )
    parser.add_argument(
        "--sigma", type=float, default=0.02, help="expert noise, in units of each tensor's std"
    )
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds between a run's flush and its start (default 5)"
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged folders under --work")
    args = parser.parse_args()
    args.mergekit_venv = args.mergekit_venv or cache_root() / "venv-mergekit"
    args.work = args.work or Path(tempfile.mkdtemp(prefix="medmerge-bench-merge-"))
    print(f"work folder: {args.work}", flush=True)

    if args.methods and not (args.mergekit_venv / "bin" / "mergekit-yaml").is_file():
        sys.exit(f"{args.mergekit_venv}/bin/mergekit-yaml not found: run bash bench/setup_mergekit.sh first")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["MEDMERGE_CACHE"] = env.get("MEDMERGE_CACHE") or str(Path.home() / ".cache" / "medmerge")
    os.environ["MEDMERGE_CACHE"] = env["MEDMERGE_CACHE"]
    from medmerge.models import resolve_model

    reference = resolve_model("smollm2-135m")
    sizes = ["135m", "360m"] if args.size == "both" else [args.size]
    benches = []
    for size in sizes:
        load_start = os.getloadavg()[0]
        base = reference if size == "135m" else random_base(reference, args.work / size / "base", size)
        bench = Bench(args, size, base, env)
        for method in args.methods:
            bench.run_shared(method)
        bench.run_new(args.new_methods)
        benches.append((bench, (load_start, os.getloadavg()[0])))
        bench.report(benches[-1][1])
    print("\n# all sizes")
    for bench, load in benches:
        bench.report(load)
    results = {b.size: {"parameters": b.params, "shared": b.shared, "new": b.new} for b, _ in benches}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
