"""medmerge vs FusionBench (fusion-bench 0.2.33) on tiny Llama-shaped models: max |Δ| per shared method.

FusionBench lives in its own venv (bench/setup_fusionbench.sh): it needs transformers >= 5, medmerge
< 5, so the two never share an interpreter. This script builds the inputs here (a tiny random Llama
base, three experts of two kinds, site statistics in medmerge's format, medmerge's DARE masks), runs
itself in the FusionBench venv with --worker (that side never imports medmerge; it reads the same
safetensors files and loads them into transformers' LlamaForCausalLM), merges the same inputs with
medmerge (`medmerge.merge.merged_state`, the engine's own path: statistics read from the expert
folders, embeddings recognised by name), and prints the largest |θ_medmerge − θ_FusionBench| over all
tensors, per method and kind of expert.

    bash bench/setup_fusionbench.sh   # once: $MEDMERGE_CACHE/venv-fusionbench (default ~/.cache/medmerge)
    .venv/bin/python bench/fusionbench_reference.py [--work DIR] [--fusionbench-venv DIR]

Experts: `dense` — θ_i = θ + τ_i on every tensor, τ_i full rank (a shared part plus its own, scaled
by 1 + i/2); `lowrank` — τ_i = B_i A_i (rank 4) on the decoder layers' Linear weights only, as a
LoRA would. FusionBench is driven through its algorithm classes where they take in-memory models
(`BaseModelPool({"_pretrained_": …, "e0": …})`) and through its tensor functions otherwise (RegMean and
Fisher merging need data loaders in their classes: `merging_with_regmean_weights` and
`merging_with_fisher_weights` get the same Gram / Fisher tensors medmerge reads). FusionBench has no
KnOTS algorithm, only `knots_utils.subspace_alignment`: the knots rows compose it with FusionBench's
`ties_merging` (per matrix, as the KnOTS code does). Where the two differ by convention, a `matched`
row sets that convention equal and shows the difference vanish (see docs/merging.md, "Reference
check: FusionBench").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LLAMA = {  # the tiny model: SmolLM2's layout (GQA, SwiGLU), untied lm_head so that it is a matrix too
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
N = 3  # experts
FAMILIES = ("dense", "lowrank")
LAM = 0.7  # λ: FusionBench's scaling_factor / alpha
DENSITY = 0.3  # TIES / DARE / KnOTS density (FusionBench: threshold = density, sparsity_ratio = 1 − density)
T = 0.35  # slerp and linear interpolation
WEIGHTS = (1.0, 0.7, 0.4)  # weighted average
ALPHA = 0.9  # RegMean: FusionBench's reduce_non_diagonal_ratio
FISHER_EPS = 1e-6  # FusionBench's minimal_fisher_weight (its default)
COMMON = 0.8  # Iso-CTS common_space_fraction
EMBED = "model.embed_tokens.weight"
EMBEDDING = re.compile(r"(embed[^.]*|wte|wpe|(^|\.)shared|relative_attention_bias)\.weight$")  # as medmerge

LOW_RANK = "low-rank: FusionBench keeps directions of σ = 0 (arbitrary vectors), medmerge drops them"
# (label, FusionBench case, medmerge case, note); the worker writes one file per FusionBench case and
# medmerge_cases() computes one state per medmerge case
ROWS = [
    ("linear, equal weights", "simple_average", "linear", "simple_average(state dicts)"),
    (
        "linear, weights 1/0.7/0.4",
        "weighted_average",
        "linear_weighted",
        "WeightedAverageAlgorithm(normalize=true)",
    ),
    (
        "linear, 2 models, t=0.35",
        "linear_interpolation",
        "linear_t",
        "{interp}",
    ),
    ("slerp, t=0.35", "slerp", "slerp", "SlerpMergeAlgorithm; same formula and lerp threshold"),
    ("task_arithmetic, λ=0.7", "task_arithmetic", "task_arithmetic", "TaskArithmeticAlgorithm"),
    (
        "ties, density 0.3, λ=0.7",
        "ties",
        "ties",
        "TiesMergingAlgorithm(merge_func=mean): one trim over the whole flattened model, "
        "keeping ⌊d·n⌋+1; medmerge trims each tensor to ⌊d·n⌋",
    ),
    (
        "  matched: medmerge on the flattened model, ⌊d·n⌋+1 kept",
        "ties",
        "ties@flat",
        "generalized_task_arithmetic on FusionBench's flat vector",
    ),
    (
        "dare_linear, density 0.3, λ=0.7",
        "dare_linear@rng",
        "dare_linear",
        "DareTaskArithmetic, its own masks (torch global RNG, keep u > 1−d): other draws; {kept}",
    ),
    (
        "  matched: medmerge's masks fed to FusionBench",
        "dare_linear",
        "dare_linear",
        "torch.rand_like patched to return medmerge's keep masks",
    ),
    (
        "dare_linear normalize (DARE simple average)",
        "dare_average",
        "dare_average",
        "DareSimpleAverage = DareTaskArithmetic(1/n), medmerge's masks",
    ),
    (
        "dare_ties, density 0.3, λ=0.7",
        "dare_ties",
        "dare_ties",
        "DareTiesMerging(merge_func=mean, threshold keeping all), medmerge's masks",
    ),
    ("model_stock, 2 experts", "model_stock2", "model_stock2", "ModelStock; t = 2cos/(1+cos)"),
    (
        "model_stock, 3 experts",
        "model_stock3",
        "model_stock3",
        "FusionBench averages the pairwise angles, medmerge the cosines",
    ),
    (
        "regmean, α=0.9",
        "regmean",
        "regmean",
        "merging_with_regmean_weights: float32 inverse, no ridge; medmerge float64 Cholesky, ridge 1e-6",
    ),
    (
        "  matched: float64 in FusionBench, medmerge ridge 1e-14",
        "regmean@float64",
        "regmean@ridge",
        "",
    ),
    ("fisher, ε=1e-6", "fisher", "fisher", "merging_with_fisher_weights(normalize_fisher_weight=false)"),
    (
        "fisher, FusionBench normalize_fisher_weight=true",
        "fisher@normalized",
        "fisher",
        "its default: model i's Fisher weighted by 1/‖F_i‖ (over all tensors)",
    ),
    (
        "  matched: medmerge weights w_i ∝ 1/(‖F_i‖+ε)",
        "fisher@normalized",
        "fisher@weights",
        "",
    ),
    (
        "tsv (TSV-M), λ=0.7",
        "tsv",
        "tsv",
        "TaskSingularVectorMerging: FusionBench also decomposes the embedding table",
    ),
    ("  matched: exclude_keys=[embed_tokens]", "tsv@exclude", "tsv", LOW_RANK),
    (
        "iso_c, λ=0.7",
        "iso_c",
        "iso_c",
        "ISO_C_Merge: FusionBench also decomposes the embedding table",
    ),
    ("  matched: exclude_keys=[embed_tokens]", "iso_c@exclude", "iso_c", LOW_RANK),
    (
        "iso_cts, λ=0.7, common 0.8",
        "iso_cts",
        "iso_cts",
        "ISO_CTS_Merge: FusionBench also decomposes the embedding table",
    ),
    ("  matched: exclude_keys=[embed_tokens]", "iso_cts@exclude", "iso_cts", LOW_RANK),
    (
        "knots, inner ta, λ=0.7",
        "knots_ta",
        "knots_ta",
        "subspace_alignment (float64 SVD, σ ≤ 1e-4 dropped) + Σ V_i",
    ),
    (
        "knots, inner ties, density 0.3",
        "knots_ties",
        "knots_ties",
        "subspace_alignment + ties_merging(mean) per matrix: ⌊d·n⌋+1 kept per V_i block",
    ),
    (
        "  matched: medmerge density per tensor, ⌊d·n⌋+1 kept",
        "knots_ties",
        "knots_ties@matched",
        "both cut the V_i blocks to the rank of [τ_1 … τ_n] (medmerge: NumPy's tolerance; FusionBench: "
        "σ > 1e-4)",
    ),
]


# ---------------------------------------------------------------------------------------------- inputs
def linear_names(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The nn.Linear weights (they have Gram matrices): every 2-D tensor but the embedding."""
    return [n for n, s in shapes.items() if len(s) == 2 and not EMBEDDING.search(n)]


def build_inputs(work: Path) -> dict[str, Path]:
    """Base, experts (with statistics.safetensors in medmerge's format) and DARE masks under work/."""
    from safetensors.torch import save_file

    from medmerge.merge.sparsify import tensor_generator
    from medmerge.site_stats import write_statistics
    from merge_vs_mergekit import llama_shapes  # a sibling bench script (this folder is on sys.path)

    shapes = llama_shapes(LLAMA)
    folders = {"base": work / "models" / "base"}
    folders |= {f"{f}-{i}": work / "models" / f"{f}-{i}" for f in FAMILIES for i in range(N)}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **LLAMA, "torch_dtype": "float32"}
    g = torch.Generator().manual_seed(0)
    base = {
        n: (1 + 0.05 * torch.randn(s, generator=g)) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)
        for n, s in shapes.items()
    }
    shared = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    lora = set(n for n in linear_names(shapes) if n.startswith("model.layers."))
    states = {"base": base}
    for i in range(N):
        scale = 0.01 * (1 + 0.5 * i)
        states[f"dense-{i}"] = {
            n: t + scale * (0.6 * shared[n] + torch.randn(t.shape, generator=g)) for n, t in base.items()
        }
        low = {}
        for n, t in base.items():
            if n in lora:
                b = torch.randn(t.shape[0], 4, generator=g)
                a = torch.randn(4, t.shape[1], generator=g)
                t = t + 0.005 * (1 + 0.5 * i) * (b @ a)
            low[n] = t.clone()
        states[f"lowrank-{i}"] = low
    for key, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({n: t.contiguous() for n, t in states[key].items()}, folder / "model.safetensors")
        if key == "base":
            continue
        i = int(key.rsplit("-", 1)[1])
        grams, fishers = {}, {}
        for n in linear_names(shapes):  # G = Σ x xᵀ over 2·in + 8 tokens, features of unequal scale
            d = shapes[n][1]
            x = torch.randn(2 * d + 8, d, generator=g) * torch.exp(0.5 * torch.randn(d, generator=g))
            grams[n] = x.T @ x
        for n, s in shapes.items():  # mean of squared "gradients" of heavy-tailed size
            draws = [
                (0.01 * (1 + i) * torch.randn(s, generator=g) * torch.exp(0.7 * torch.randn(s, generator=g)))
                ** 2
                for _ in range(4)
            ]
            fishers[n] = torch.stack(draws).mean(0)
        write_statistics(folder, grams, fishers, {"examples": 4, "tokens": 0, "data": "random (bench)"})
    masks = work / "masks"
    masks.mkdir(exist_ok=True)
    for i in range(N):  # exactly medmerge's bernoulli draws: keep where u < density
        keep = {
            n: (tensor_generator(0, n, i).uniform(s) < DENSITY).to(torch.uint8) for n, s in shapes.items()
        }
        save_file(keep, masks / f"{i}.safetensors")
    return folders


# ---------------------------------------------------------------------------------------- the worker
def worker(work: Path) -> None:
    """Run every FusionBench case on both families; write work/fusionbench/<family>/<case>.safetensors."""
    import lightning
    from fusion_bench.method import (
        DareSimpleAverage,
        DareTaskArithmetic,
        DareTiesMerging,
        ISO_C_Merge,
        ISO_CTS_Merge,
        LinearInterpolationAlgorithm,
        ModelStock,
        SlerpMergeAlgorithm,
        TaskArithmeticAlgorithm,
        TaskSingularVectorMerging,
        TiesMergingAlgorithm,
        WeightedAverageAlgorithm,
    )
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from fusion_bench.method.knots.knots_utils import subspace_alignment
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from fusion_bench.method.simple_average import simple_average
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging
    from fusion_bench.modelpool import BaseModelPool
    from fusion_bench.utils.state_dict_arithmetic import state_dict_weighted_sum
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA)
    models = work / "models"
    base_sd = load_file(models / "base" / "model.safetensors")
    masks = [load_file(work / "masks" / f"{i}.safetensors") for i in range(N)]
    total = sum(t.numel() for t in base_sd.values())
    keep_all = 1 - 0.5 / total  # a TIES threshold that keeps every entry (int(n·K) = n − 1 → all ≥ min)

    def module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = LlamaForCausalLM(config)
        model.load_state_dict(sd, strict=True)
        return model.float().eval()

    def fabric(algorithm):
        """The spectral algorithms ask their LightningFabricMixin for a device: give them a CPU Fabric."""
        algorithm.fabric = lightning.Fabric(accelerator="cpu", devices=1)
        return algorithm

    def with_masks(run, experts: list[torch.nn.Module]):
        """Run with torch.rand_like returning medmerge's keep mask as 1.0/0.0 for each expert parameter
        (FusionBench keeps where rand_like > sparsity_ratio, which 1.0 passes and 0.0 does not)."""
        names = {id(p): (i, n) for i, e in enumerate(experts) for n, p in e.named_parameters()}
        original = torch.rand_like

        def rand_like(x, *args, **kwargs):
            i, n = names[id(x)]
            return masks[i][n].to(x.dtype)

        torch.rand_like = rand_like
        try:
            return run()
        finally:
            torch.rand_like = original

    def state(x) -> dict[str, torch.Tensor]:
        sd = x.state_dict() if isinstance(x, torch.nn.Module) else x
        return {n: t.detach().to(torch.float32).contiguous() for n, t in sd.items()}

    def one_family(family: str) -> None:
        out = work / "fusionbench" / family
        out.mkdir(parents=True, exist_ok=True)
        sds = [load_file(models / f"{family}-{i}" / "model.safetensors") for i in range(N)]
        stats = [load_file(models / f"{family}-{i}" / "statistics.safetensors") for i in range(N)]
        # FusionBench keys Grams by module name, Fishers by parameter name
        grams = [{k[6:-7]: v for k, v in s.items() if k.startswith("gram::")} for s in stats]
        fishers = [{k[8:]: v for k, v in s.items() if k.startswith("fisher::")} for s in stats]
        notes: dict[str, str] = {}

        def pool(k: int = N, pretrained: bool = True, fresh: list | None = None) -> BaseModelPool:
            experts = fresh if fresh is not None else [module(sd) for sd in sds[:k]]
            named = {f"e{i}": m for i, m in enumerate(experts)}
            return BaseModelPool(({"_pretrained_": module(base_sd)} if pretrained else {}) | named)

        def dare(algorithm):
            experts = [module(sd) for sd in sds]
            return with_masks(lambda: algorithm.run(pool(fresh=experts)), experts)

        def knots(inner: str) -> dict[str, torch.Tensor]:
            merged = {}
            for name, theta in base_sd.items():
                taus = [sd[name] - theta for sd in sds]
                if theta.dim() == 2 and not EMBEDDING.search(name):
                    u, s, vhs = subspace_alignment(taus)
                    if s.numel() == 0:  # τ_i = 0 (a matrix no LoRA touched): no direction survives its cut
                        v = torch.zeros(0, theta.shape[1])
                    elif inner == "ta":
                        v = sum(vhs)
                    else:
                        flat = torch.stack([vh.reshape(-1) for vh in vhs])
                        v = ties_merging(flat, reset_thresh=DENSITY, merge_func="mean").reshape(vhs[0].shape)
                    delta = u @ torch.diag(s) @ v
                elif inner == "ta":
                    delta = sum(taus)
                else:
                    flat = torch.stack([t.reshape(-1) for t in taus])
                    delta = ties_merging(flat, reset_thresh=DENSITY, merge_func="mean").reshape(theta.shape)
                merged[name] = theta + LAM * delta
            return merged

        def interpolation():
            try:
                return LinearInterpolationAlgorithm(t=T).run(pool(2, pretrained=False))
            except AssertionError as exc:
                notes["linear_interpolation"] = (
                    f"LinearInterpolationAlgorithm.run fails in FusionBench ({str(exc)!r}: it asserts "
                    "all_model_names == 2, a list against an int), so its state_dict_weighted_sum is called"
                )
                return state_dict_weighted_sum([sds[0], sds[1]], [1 - T, T])

        def regmean(dtype: torch.dtype):
            params = {n: [sd[n].to(dtype) for sd in sds] for n in base_sd}
            g = [{k: v.to(dtype) for k, v in gi.items()} for gi in grams]
            return merging_with_regmean_weights(params, g, reduce_non_diagonal_ratio=ALPHA)

        def fisher(normalize: bool):
            params = {n: [sd[n] for sd in sds] for n in base_sd}
            return merging_with_fisher_weights(
                params,
                fishers,
                fisher_scaling_coefficients=torch.ones(N),
                normalize_fisher_weight=normalize,
                minimal_fisher_weight=FISHER_EPS,
            )

        def spectral(algorithm):
            return fabric(algorithm).run(pool())

        def rng_dare():
            torch.manual_seed(0)
            algorithm = DareTaskArithmetic(
                scaling_factor=LAM, sparsity_ratio=1 - DENSITY, only_on_linear_weights=False, rescale=True
            )
            return algorithm.run(pool())

        cases = {
            "simple_average": lambda: simple_average([dict(sd) for sd in sds]),
            "weighted_average": lambda: WeightedAverageAlgorithm(
                normalize=True, weights=list(WEIGHTS), verbose=False
            ).run(pool(pretrained=False)),
            "linear_interpolation": interpolation,
            "slerp": lambda: SlerpMergeAlgorithm(t=T).run(pool(2, pretrained=False)),
            "task_arithmetic": lambda: TaskArithmeticAlgorithm(scaling_factor=LAM).run(pool()),
            "ties": lambda: TiesMergingAlgorithm(
                scaling_factor=LAM, threshold=DENSITY, remove_keys=[], merge_func="mean"
            ).run(pool()),
            "dare_linear@rng": rng_dare,
            "dare_linear": lambda: dare(
                DareTaskArithmetic(
                    scaling_factor=LAM, sparsity_ratio=1 - DENSITY, only_on_linear_weights=False, rescale=True
                )
            ),
            "dare_average": lambda: dare(
                DareSimpleAverage(sparsity_ratio=1 - DENSITY, only_on_linear_weights=False, rescale=True)
            ),
            "dare_ties": lambda: dare(
                DareTiesMerging(
                    sparsity_ratio=1 - DENSITY,
                    only_on_linear_weights=False,
                    rescale=True,
                    scaling_factor=LAM,
                    threshold=keep_all,
                    remove_keys=[],
                    merge_func="mean",
                )
            ),
            "model_stock2": lambda: ModelStock(ignore_keys=[]).run(pool(2)),
            "model_stock3": lambda: ModelStock(ignore_keys=[]).run(pool(3)),
            "regmean": lambda: regmean(torch.float32),
            "regmean@float64": lambda: regmean(torch.float64),
            "fisher": lambda: fisher(False),
            "fisher@normalized": lambda: fisher(True),
            "tsv": lambda: spectral(TaskSingularVectorMerging(alpha=LAM)),
            "tsv@exclude": lambda: spectral(TaskSingularVectorMerging(alpha=LAM, exclude_keys=[EMBED])),
            "iso_c": lambda: spectral(ISO_C_Merge(scaling_factor=LAM)),
            "iso_c@exclude": lambda: spectral(ISO_C_Merge(scaling_factor=LAM, exclude_keys=[EMBED])),
            "iso_cts": lambda: spectral(ISO_CTS_Merge(scaling_factor=LAM, common_space_fraction=COMMON)),
            "iso_cts@exclude": lambda: spectral(
                ISO_CTS_Merge(scaling_factor=LAM, common_space_fraction=COMMON, exclude_keys=[EMBED])
            ),
            "knots_ta": lambda: knots("ta"),
            "knots_ties": lambda: knots("ties"),
        }
        for case, run in cases.items():
            try:
                with torch.no_grad():
                    merged = state(run())
                save_file(merged, out / f"{case}.safetensors")
            except Exception as exc:  # reported in the table, the other cases go on
                notes[case] = f"FusionBench error: {type(exc).__name__}: {exc}"[:300]
        (out / "notes.json").write_text(json.dumps(notes, indent=2))

    for family in FAMILIES:
        one_family(family)


# ------------------------------------------------------------------------------------ medmerge's side
def medmerge_cases(folders: dict[str, Path], family: str) -> dict[str, dict[str, torch.Tensor]]:
    """The merged float32 state of every medmerge case for one family of experts."""
    from safetensors.torch import load_file

    from medmerge.config import MergeConfig
    from medmerge.merge import data_aware, merged_state, methods, spectral
    from medmerge.merge.params import InnerMergeParams

    base = str(folders["base"])
    experts = [str(folders[f"{family}-{i}"]) for i in range(N)]
    base_sd = load_file(folders["base"] / "model.safetensors")
    sds = [load_file(Path(e) / "model.safetensors") for e in experts]

    def run(method: str, parameters: dict | None = None, weights=None, k=N, with_base=True):
        weights = weights or [1.0] * k
        config = {
            "method": method,
            "models": [{"path": p, "weight": w} for p, w in zip(experts[:k], weights, strict=True)],
            "parameters": parameters or {},
        }
        return merged_state(MergeConfig.model_validate(config | ({"base_model": base} if with_base else {})))

    def ties_flat() -> dict[str, torch.Tensor]:
        """TIES over FusionBench's flat vector (names sorted), keeping ⌊d·n⌋ + 1 entries as it does."""
        names = sorted(base_sd)
        flat = [torch.cat([sd[n].reshape(-1) for n in names]) for sd in sds]
        base_flat = torch.cat([base_sd[n].reshape(-1) for n in names])
        n = base_flat.numel()
        density = (int(n * DENSITY) + 1.5) / n  # int(density·n) = int(n·d) + 1
        merged = methods.generalized_task_arithmetic(
            base_flat, flat, [1.0] * N, sparsifier="magnitude", density=density, sign_consensus=True, lam=LAM
        ).tensor
        out, start = {}, 0
        for name in names:
            size = base_sd[name].numel()
            out[name] = merged[start : start + size].reshape(base_sd[name].shape)
            start += size
        return out

    def knots_matched() -> dict[str, torch.Tensor]:
        """KnOTS-TIES tensor by tensor, each V_i block (or τ_i) trimmed to ⌊d·n⌋ + 1 as FusionBench does."""
        out = {}
        for name, theta in base_sd.items():
            if spectral.is_matrix(name, theta):  # medmerge's V_i blocks: the numerical rank of [τ_1 … τ_n]
                s = torch.linalg.svdvals(torch.cat([sd[name] - theta for sd in sds], dim=1))
                size = max(1, spectral._rank(s, (theta.shape[0], N * theta.shape[1]))) * theta.shape[1]
            else:
                size = theta.numel()
            density = min(1.0, (int(size * DENSITY) + 1.5) / size)
            params = InnerMergeParams.model_validate({"inner": "ties", "density": density, "lambda": LAM})
            thetas = [sd[name].clone() for sd in sds]
            out[name] = spectral.knots(name, theta.clone(), thetas, [1.0] * N, params).tensor
        return out

    def regmean_small_ridge() -> dict[str, torch.Tensor]:
        ridge = data_aware.RIDGE
        data_aware.RIDGE = 1e-14  # module constant read at call time; restored below
        try:
            return run("regmean", {"alpha": ALPHA}, with_base=False)
        finally:
            data_aware.RIDGE = ridge

    def fisher_weights() -> list[float]:
        """FusionBench's normalize_fisher_weight as model weights: 1/(‖F_i‖ + ε), ‖·‖ over all tensors."""
        from safetensors.torch import load_file as load

        inverse = []
        for e in experts:
            stats = load(Path(e) / "statistics.safetensors")
            norm = torch.stack([v.norm() for k, v in stats.items() if k.startswith("fisher::")]).norm()
            inverse.append(1.0 / (float(norm) + FISHER_EPS))
        return [w / sum(inverse) for w in inverse]

    dare = {"density": DENSITY, "lambda": LAM, "seed": 0}
    cases = {
        "linear": lambda: run("linear", with_base=False),
        "linear_weighted": lambda: run("linear", weights=list(WEIGHTS), with_base=False),
        "linear_t": lambda: run("linear", weights=[1 - T, T], k=2, with_base=False),
        "slerp": lambda: run("slerp", {"t": T}, k=2, with_base=False),
        "task_arithmetic": lambda: run("task_arithmetic", {"lambda": LAM}),
        "ties": lambda: run("ties", {"density": DENSITY, "lambda": LAM}),
        "ties@flat": ties_flat,
        "dare_linear": lambda: run("dare_linear", dare),
        "dare_average": lambda: run("dare_linear", dare | {"lambda": 1.0, "normalize": True}),
        "dare_ties": lambda: run("dare_ties", dare),
        "model_stock2": lambda: run("model_stock", k=2),
        "model_stock3": lambda: run("model_stock", k=3),
        "regmean": lambda: run("regmean", {"alpha": ALPHA}, with_base=False),
        "regmean@ridge": regmean_small_ridge,
        "fisher": lambda: run("fisher", {"epsilon": FISHER_EPS}, with_base=False),
        "fisher@weights": lambda: run("fisher", {"epsilon": FISHER_EPS}, fisher_weights(), with_base=False),
        "tsv": lambda: run("tsv", {"lambda": LAM}),
        "iso_c": lambda: run("iso_c", {"lambda": LAM}),
        "iso_cts": lambda: run("iso_cts", {"lambda": LAM, "common_fraction": COMMON}),
        "knots_ta": lambda: run("knots", {"inner": "ta", "lambda": LAM}),
        "knots_ties": lambda: run("knots", {"inner": "ties", "density": DENSITY, "lambda": LAM}),
        "knots_ties@matched": knots_matched,
    }
    return {case: f() for case, f in cases.items()}


def low_rank_checks(folders: dict[str, Path], work: Path) -> list[str]:
    """Why the low-rank spectral rows differ, checked on every LoRA-touched matrix: FusionBench's formulas
    keep (iso_c) or medmerge's knots keeps the singular directions of σ = 0; cut to the numerical rank,
    the two agree, while the kept null directions make a result depend on its SVD's arbitrary basis."""
    from safetensors.torch import load_file

    from medmerge.merge import methods, sparsify, spectral
    from medmerge.merge.params import IsoCParams

    base = load_file(folders["base"] / "model.safetensors")
    sds = [load_file(folders[f"lowrank-{i}"] / "model.safetensors") for i in range(N)]
    fb = {
        c: load_file(work / "fusionbench" / "lowrank" / f"{c}.safetensors") for c in ("iso_c", "knots_ties")
    }
    worst = {"iso_again": 0.0, "iso_cut": 0.0, "knots_cut": 0.0}
    null_share = []
    for name, theta in base.items():
        taus = [sd[name] - theta for sd in sds]
        if not name.startswith("model.layers.") or theta.dim() != 2 or not any(t.any() for t in taus):
            continue
        total = sum(taus)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        r = int((s > s[0] * max(total.shape) * torch.finfo(s.dtype).eps).sum())
        again = theta + LAM * s.mean() * (u @ vh)  # FusionBench's Iso-C formula, M summed here
        cut = theta + LAM * s[:r].mean() * (u[:, :r] @ vh[:r])
        params = IsoCParams.model_validate({"lambda": LAM})
        ours = spectral.iso_c(name, theta.clone(), [sd[name].clone() for sd in sds], [1.0] * N, params).tensor
        worst["iso_again"] = max(worst["iso_again"], float((fb["iso_c"][name] - again).abs().max()))
        worst["iso_cut"] = max(worst["iso_cut"], float((ours - cut).abs().max()))
        # KnOTS-TIES with the V_i blocks cut to the rank of [τ_1 … τ_n], ⌊d·n⌋ + 1 kept as FusionBench does
        u, s, vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
        rank = int((s > s[0] * max(u.shape[0], vh.shape[1]) * torch.finfo(s.dtype).eps).sum())
        cols = theta.shape[1]
        blocks = [vh[:, i * cols : (i + 1) * cols] for i in range(N)]
        size = rank * cols
        cut_blocks = [b[:rank].contiguous() for b in blocks]
        merged = methods.generalized_task_arithmetic(
            torch.zeros_like(cut_blocks[0]),
            cut_blocks,
            [1.0] * N,
            sparsifier="magnitude",
            density=(int(size * DENSITY) + 1.5) / size,
            sign_consensus=True,
            lam=LAM,
        ).tensor
        knots_cut = theta + (u[:, :rank] * s[:rank]) @ merged
        worst["knots_cut"] = max(worst["knots_cut"], float((fb["knots_ties"][name] - knots_cut).abs().max()))
        keep = sparsify.magnitude(blocks[0].clone(), DENSITY)[1]  # a trim over all k rows, uncut
        null_share.append(int(keep[rank:].sum()) / max(int(keep.sum()), 1))
    return [
        f"low-rank iso_c: FusionBench's output vs its own formula recomputed here (M = Σ τ_i instead of "
        f"(Σ τ_i / n)·n): {worst['iso_again']:.1e}; medmerge vs that formula cut to the numerical rank: "
        f"{worst['iso_cut']:.1e}",
        "low-rank knots ties: a trim of V_1 over all its k = min(out, n·in) rows (medmerge before the cut) "
        "keeps "
        f"{min(null_share):.0%}–{max(null_share):.0%} of its entries on rows of σ = 0 (arbitrary vectors); "
        "KnOTS-TIES with the blocks cut to the numerical rank vs FusionBench: "
        f"{worst['knots_cut']:.1e}",
    ]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        raise ValueError(f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}")
    return max(float((a[n].to(torch.float32) - b[n].to(torch.float32)).abs().max()) for n in a)


def kept_fraction(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    changed = sum(int((merged[n] != base[n]).sum()) for n in base)
    return changed / sum(t.numel() for t in base.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="inputs and FusionBench outputs (default: a temp folder)")
    parser.add_argument(
        "--fusionbench-venv",
        type=Path,
        help="default: $MEDMERGE_CACHE/venv-fusionbench (setup_fusionbench.sh)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # run inside the FusionBench venv
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return

    from safetensors.torch import load_file

    from medmerge.models import cache_root

    venv = args.fusionbench_venv or cache_root() / "venv-fusionbench"
    python = venv / "bin" / "python"
    if not python.is_file():
        sys.exit(f"{python} not found: run bash bench/setup_fusionbench.sh first")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="medmerge-bench-fusionbench-"))
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {args.work}", flush=True)
    folders = build_inputs(args.work)

    log = args.work / "fusionbench-worker.log"
    with open(log, "w") as out:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
        done = subprocess.run(
            [str(python), str(Path(__file__).resolve()), "--worker", str(args.work)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=args.work,
        )
    if done.returncode != 0:
        sys.exit(f"the FusionBench worker failed ({done.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('fusion-bench'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()

    base_sd = load_file(folders["base"] / "model.safetensors")
    results: dict[str, dict[str, str]] = {}
    notes: dict[str, str] = {}
    for family in FAMILIES:
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            ours = medmerge_cases(folders, family)
        fb_dir = args.work / "fusionbench" / family
        fb_notes = json.loads((fb_dir / "notes.json").read_text())
        notes |= {k: v for k, v in fb_notes.items() if not v.startswith("FusionBench error")}
        for row, (_, fb_case, mm_case, _) in enumerate(ROWS):
            file = fb_dir / f"{fb_case}.safetensors"
            if not file.is_file():
                results.setdefault(str(row), {})[family] = fb_notes.get(fb_case, "missing")
                continue
            theirs = load_file(file)
            results.setdefault(str(row), {})[family] = f"{max_diff(ours[mm_case], theirs):.1e}"
            if fb_case == "dare_linear@rng":
                notes[f"kept-{family}"] = (
                    f"{family}: entries changed {kept_fraction(ours[mm_case], base_sd):.3f} (medmerge) vs "
                    f"{kept_fraction(theirs, base_sd):.3f} (FusionBench)"
                )

    kept = "; ".join(v for k, v in notes.items() if k.startswith("kept-"))
    interp = notes.get("linear_interpolation", "LinearInterpolationAlgorithm(t)")
    print()
    size = sum(t.numel() for t in base_sd.values())
    print(
        f"medmerge vs fusion-bench {version} on a tiny random Llama ({size} "
        f"parameters, hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']} layers), {N} experts, "
        "float32; max |θ_medmerge − θ_FusionBench| over all tensors"
    )
    print("| method | dense experts | low-rank experts | FusionBench side, conventions |")
    print("|---|---|---|---|")
    for row, (label, _, _, note) in enumerate(ROWS):
        found = results.get(str(row), {})
        text = note.format(interp=interp, kept=kept)
        print(f"| {label} | {found.get('dense', '—')} | {found.get('lowrank', '—')} | {text} |")
    checks = low_rank_checks(folders, args.work)
    print("\n".join(checks))
    (args.work / "results.json").write_text(
        json.dumps({"results": results, "notes": notes, "low_rank_checks": checks}, indent=2)
    )


if __name__ == "__main__":
    main()
