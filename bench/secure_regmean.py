"""RegMean through a secure sum on the real model: quantization precision, and the DP noise's cost.

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/secure_regmean.py \
        runs/stats/nci runs/stats/genetics runs/stats/chatdoctor --examples 128 --bits 8 12 16 20 24 \
        --sigmas 0.5 1 2 4 --json runs/stats/secure_regmean.json

Three LoRA experts (the sites, weights 1/3 each), their Gram statistics (`medmerge stats`, made here
when missing). The reference is today's RegMean (medmerge.merge.data_aware.regmean_solve) from each
site's own Grams, α = 0.9. Then, Gram by Gram (to hold one module's terms at a time):
- each site's contribution (medmerge.merge.from_sums.site_contribution: packed w·G/d, w·ΔW·G/d,
  w·ΔW·diag(G)/d, w·ΔW) is quantized as SecAgg+ quantizes (flwr.common.secure_aggregation.quantization:
  clip to ±R, stochastic rounding onto 2^b levels), summed modulo 2^32 (what the masked sum yields: the
  masks cancel exactly) and dequantized with Flower's offset −(K − 1)·R; R per tensor is the sum over
  sites of each site's largest |value| (a first, tiny secure sum), so nothing is clipped;
- the coordinator merges from the sums (from_sums.regmean_from_sums: PSD projection, + λI).
Measured: the merged weights' error against the reference (‖W − W_ref‖ / ‖W_ref − W₀‖, largest over all
weights) and the merged model's validation loss (nats per answer token, the sites' validation questions)
minus the reference's. Normalisations: "none" (today's merge, d = a public token budget) and "tokens"
(each site divides by its own token count; compared with the exact merge of the normalised Grams).

DP (`--sigmas`): the sites' clipped statistics (compute_statistics(privacy=ClipSettings(C))), C the
median per-example norm N_i of the whole released vector, measured here; each site adds its share of
N(0, σ²C²w²/d²) (medmerge.merge.sum_noise, n = 3), quantized at the chosen width with the public range
R = n·C·w/d + 6σCw/d; merged with from_sums' noise ridge (noise_std = σCw/d).
ε per release and after 12 releases (a search's trials) from Opacus's RDP accountant at δ = 1e-6.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medmerge.data import pad_batch
from medmerge.loss import answer_loss
from medmerge.merge.data_aware import regmean_solve
from medmerge.merge.from_sums import (
    SumLayout,
    add_contributions,
    regmean_from_sums,
    site_contribution,
)
from medmerge.merge.sum_noise import noised_contribution
from medmerge.models import adapter_base, load_model, load_tokenizer, model_kind
from medmerge.site_stats import SiteStatistics, has_statistics
from medmerge.threads import use_threads
from medmerge.train.examples import prepare_data
from medmerge.train.private_stats import ClipSettings, collect_clipped_grams, spectral_norms, unit_sample
from medmerge.train.statistics import (
    base_weight_names,
    collect_grams,
    compute_statistics,
    expert_deltas,
    expert_train_config,
    input_scales,
    statistic_linears,
)

ALPHA = 0.9
MODULUS = 2**32


def quantized_sum(tensors: list[torch.Tensor], bits: int, limit: float | None = None) -> torch.Tensor:
    """Σ tensors through SecAgg+'s quantization: Flower's quantize / dequantize, modular sum."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    levels = 2**bits
    arrays = [t.double().numpy() for t in tensors]
    if limit is None:
        limit = float(sum(np.abs(a).max() for a in arrays)) or 1.0
    total = np.zeros(arrays[0].shape, dtype=np.int64)
    for q in quantize(arrays, limit, levels):
        total = (total + q.astype(np.int64)) % MODULUS
    (summed,) = dequantize([total], limit, levels)
    return torch.from_numpy(summed - (len(arrays) - 1) * limit)


def public_scales(model: torch.nn.Module, modules: dict, tokenizer, examples: int) -> dict[str, torch.Tensor]:
    """The layout's public input scales D: √(diag G / tokens) of the BASE model's Linear inputs over
    PubMedQA questions with their long answers (public text; the sites' encoding, 64 + 64 tokens)."""
    from medmerge.data import encode_pair, load_dataset

    pairs = load_dataset("pubmedqa").pairs[:examples]
    encoded = [encode_pair(p.question, p.answer, tokenizer, "causal", 64, 64) for p in pairs]
    return input_scales(collect_grams(model, modules, encoded, tokenizer.pad_token_id))


def validation_batches(experts: list[Path], per_site: int) -> list[dict]:
    examples = []
    for expert in experts:
        config, _ = expert_train_config(expert, None)
        examples += prepare_data(config, load_tokenizer(expert), model_kind(expert)).validation[:per_site]
    pad = load_tokenizer(experts[0]).pad_token_id
    examples.sort(key=lambda e: len(e["input_ids"]))
    return [pad_batch(examples[i : i + 8], pad) for i in range(0, len(examples), 8)]


def loss_of(model: torch.nn.Module, base: dict, merged: dict, batches: list[dict]) -> float:
    state = {**base, **merged}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])
    return answer_loss(model, batches).mean


def _rel(a: dict, b: dict, base: dict) -> float:
    return max(float((a[n] - b[n]).norm() / (b[n] - base[n]).norm().clamp(min=1e-30)) for n in b)


def merge_through_sums(
    sites: list[dict],
    base: dict,
    layout: SumLayout,
    bits: int | None,
    noise: dict | None = None,
    limit_of=None,
) -> dict[str, torch.Tensor]:
    """RegMean via the sums, one stored Gram at a time (module doc); bits None: exact sums."""
    merged: dict[str, torch.Tensor] = {}
    aliases = sites[0]["aliases"]
    stored = sorted(set(sites[0]["grams"]))
    weight = 1.0 / len(sites)
    for m in stored:
        readers = [m] + sorted(k for k, v in aliases.items() if v == m)
        contributions = []
        for site in sites:
            c = site_contribution(
                {k: site["deltas"][k] for k in readers},
                weight,
                grams={m: site["grams"][m]},
                aliases={k: m for k in readers if k != m},
                tokens=site["tokens"],
                layout=layout,
            )
            if noise is not None:
                c = noised_contribution(c, **noise, charge=lambda r: None)
            contributions.append(c)
        if bits is None:
            sums, total = add_contributions(contributions)
        else:
            total = sum(c.weight for c in contributions)
            sums = {}
            for name in contributions[0].tensors:
                limit = limit_of(name) if limit_of is not None else None
                sums[name] = quantized_sum([c.tensors[name] for c in contributions], bits, limit)
        std = 0.0
        if noise is not None:
            std = noise["sigma"] * noise["clip"] * noise["w_max"] / layout.scale
        out = regmean_from_sums(
            sums,
            base,
            total,
            ALPHA,
            aliases=contributions[0].aliases,
            noise_std=std,
            input_scales=layout.input_scales,
        )
        merged.update({k: v for k, v in out.weights.items() if k in readers})
    return merged


def _epsilon(sigma: float, releases: int, delta: float = 1e-6) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, releases)]
    return float(accountant.get_epsilon(delta=delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experts", type=Path, nargs="+")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 12, 16, 20, 24])
    parser.add_argument("--token-bits", type=int, nargs="*", default=None, help="bits for normalise=tokens")
    parser.add_argument("--sigmas", type=float, nargs="*", default=[])
    parser.add_argument("--dp-bits", type=int, default=16)
    parser.add_argument("--validation", type=int, default=24, help="validation questions per site")
    parser.add_argument("--public", type=int, default=32, help="PubMedQA questions for the input scales")
    parser.add_argument("--unscaled-bits", type=int, nargs="*", default=[], help="also without input scales")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    use_threads(args.threads)
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    started = time.perf_counter()
    result: dict = {"examples": args.examples, "alpha": ALPHA, "sites": [e.name for e in args.experts]}

    base_path = adapter_base(args.experts[0])
    model = load_model(base_path).eval()
    modules = statistic_linears(model, base_weight_names(args.experts[0]))
    base = {n: m.weight.detach().clone() for n, m in modules.items()}
    sites = []
    for expert in args.experts:
        if not has_statistics(expert):
            t = time.perf_counter()
            compute_statistics(expert, kinds=["gram"], max_examples=args.examples, progress=False)
            result.setdefault("statistics_seconds", []).append(round(time.perf_counter() - t, 1))
        expert_model = load_model(expert).eval()
        deltas = expert_deltas(expert, statistic_linears(expert_model, set(modules)))
        del expert_model
        with SiteStatistics.open(expert) as stats:
            grams = {n: stats.read("gram", n).double() for n in modules if n not in stats.info["aliases"]}
            sites.append(
                {
                    "deltas": deltas,
                    "grams": grams,
                    "aliases": stats.info["aliases"],
                    "tokens": stats.info["tokens"],
                }
            )
    batches = validation_batches(args.experts, args.validation)
    t = time.perf_counter()
    scales = public_scales(model, modules, load_tokenizer(args.experts[0]), args.public)
    result["public_scales_seconds"] = round(time.perf_counter() - t, 1)
    weights = [1.0 / len(sites)] * len(sites)

    def reference(normalise: str) -> dict[str, torch.Tensor]:
        merged = {}
        for name in base:
            stored = sites[0]["aliases"].get(name, name)
            thetas = [base[name] + s["deltas"][name] for s in sites]
            grams = [s["grams"][stored] / (s["tokens"] if normalise == "tokens" else 1) for s in sites]
            merged[name] = regmean_solve(thetas, grams, weights, ALPHA)
        return merged

    linear = {n: base[n] + sum(s["deltas"][n] for s in sites) / len(sites) for n in base}
    result["loss_linear"] = loss_of(model, base, linear, batches)
    budget = float(args.examples * 128)  # a public divisor: questions × (prompt + answer) token cap
    rows = []
    for normalise in ("none", "tokens"):
        ref = reference(normalise)
        ref_loss = loss_of(model, base, ref, batches)
        result[f"loss_regmean_{normalise}"] = ref_loss
        layout = SumLayout(scale=budget, normalise=normalise, input_scales=scales)
        exact = merge_through_sums(sites, base, layout, None)
        rows.append({"normalise": normalise, "bits": "exact", "weight_error": _rel(exact, ref, base)})
        widths = args.bits if normalise == "none" or args.token_bits is None else args.token_bits
        runs = [(b, layout) for b in widths]
        if normalise == "none":
            runs += [(b, SumLayout(scale=budget)) for b in args.unscaled_bits]
        for bits, chosen in runs:
            t = time.perf_counter()
            merged = merge_through_sums(sites, base, chosen, bits)
            loss = loss_of(model, base, merged, batches)
            row = {
                "normalise": normalise,
                "input_scales": chosen.input_scales is not None,
                "bits": bits,
                "weight_error": _rel(merged, ref, base),
                "loss": loss,
                "loss_minus_plain": loss - ref_loss,
                "seconds": round(time.perf_counter() - t, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result["quantization"] = rows
    values = sum(
        t.numel()
        for t in site_contribution(
            sites[0]["deltas"], 1.0, grams=sites[0]["grams"], aliases=sites[0]["aliases"]
        ).tensors.values()
    )
    result["values_per_site"] = values
    result["bytes_per_site_int32"] = 4 * values

    if args.sigmas:
        result["dp"] = dp_rows(args, model, modules, base, sites, batches, result, budget, scales)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load"] = Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def dp_rows(args, model, modules, base, sites, batches, result, budget, scales) -> list[dict]:
    """Clipped statistics per site, C the median N_i over all sites, then the noised, quantized merge
    per σ. Two passes per site (the norms, then the clipped sums), one expert model in memory at a time."""
    samples, norms = [], []
    for expert, site in zip(args.experts, sites, strict=True):
        config, _ = expert_train_config(expert, None)
        tokenizer = load_tokenizer(expert)
        data = prepare_data(config, tokenizer, model_kind(expert))
        rate = min(1.0, args.examples / len(data.train))
        picked = [data.train[i] for i in unit_sample(data.train, None, ClipSettings(clip=1.0, rate=rate))]
        expert_model = load_model(expert).eval()
        mods = statistic_linears(expert_model, set(modules))
        site["spectral"] = spectral_norms(site["deltas"], scales)
        t = time.perf_counter()
        unlimited = ClipSettings(clip=1e30)
        _, _, n_i = collect_clipped_grams(
            expert_model,
            mods,
            picked,
            tokenizer.pad_token_id,
            site["spectral"],
            unlimited,
            input_scales=scales,
        )
        result.setdefault("norm_pass_seconds", []).append(round(time.perf_counter() - t, 1))
        norms.append(n_i)
        samples.append((picked, tokenizer.pad_token_id))
        del expert_model, mods
    all_norms = torch.cat(norms)
    clip = float(all_norms.median())
    result["per_example_norm_quantiles"] = {
        q: float(all_norms.quantile(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
    }
    result["spectral_max"] = max(max(s["spectral"].values()) for s in sites)
    result["clip"] = clip
    noisy_sites = []
    for expert, (picked, pad), site in zip(args.experts, samples, sites, strict=True):
        expert_model = load_model(expert).eval()
        mods = statistic_linears(expert_model, set(modules))
        grams, _, _ = collect_clipped_grams(
            expert_model, mods, picked, pad, site["spectral"], ClipSettings(clip=clip), input_scales=scales
        )
        noisy_sites.append({**site, "grams": dict(grams.sums), "units": len(picked)})
        del expert_model, mods
    ref_loss = result["loss_regmean_none"]
    w = 1.0 / len(sites)
    layout = SumLayout(scale=budget, input_scales=scales)
    clipped_exact = merge_through_sums(noisy_sites, base, layout, None)
    result["loss_clipped_exact"] = loss_of(model, base, clipped_exact, batches)
    units = max(s["units"] for s in noisy_sites)
    rows = []
    for sigma in args.sigmas:
        noise = {"sigma": sigma, "clip": clip, "w_max": w, "layout": layout, "noised_sites": len(sites)}
        limit = (units + 6 * sigma) * clip * w / budget  # public: every entry of every term is below it

        def limit_of(name: str, limit: float = limit) -> float:
            return limit

        merged = merge_through_sums(noisy_sites, base, layout, args.dp_bits, noise=noise, limit_of=limit_of)
        loss = loss_of(model, base, merged, batches)
        row = {
            "sigma": sigma,
            "clip": clip,
            "bits": args.dp_bits,
            "loss": loss,
            "loss_minus_plain": loss - ref_loss,
            "loss_minus_linear": loss - result["loss_linear"],
            "epsilon_1_release": _epsilon(sigma, 1),
            "epsilon_12_releases": _epsilon(sigma, 12),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
