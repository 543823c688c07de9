"""The attack on site statistics, kept as a bench: a site's token counts from layer 0's Gram matrix.

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/gram_inversion.py \
        runs/stats/nci runs/stats/genetics runs/stats/chatdoctor --examples 256 --clip C --sigma S

Layer 0's q/k/v input is x_t = RMSNorm(E[v_t])·γ: it depends on the token v_t alone (RoPE comes after the
projection). So with u_v = RMSNorm(E_v)·γ (576 numbers per vocabulary entry) a site's layer-0 Gram is

    G₀ = Σ_t x_t x_tᵀ = Σ_v c_v u_v u_vᵀ = Uᵀ diag(c) U,      U (V × 576), c ∈ ℕ^V its token counts,

a linear system in c with 576·577/2 = 166,176 equations (the upper triangle) and V = 49,152 unknowns, over
the FULL vocabulary. The attack is non-negative least squares, min_{c ≥ 0} ‖P(Uᵀ diag(c) U − G)P‖_F²
(P = M^(-1/2), M = UᵀU / V: whitening, so that the tokens' vectors are nearly orthogonal on average; the
exact solution is the same), by a block Lawson–Hanson active set over all 49,152 tokens: the gradient
g_v = ũ_vᵀ (Ũᵀ diag(c) Ũ − P G P) ũ_v (ũ = P u) is computed for every token, the 300 most negative
(scaled by ‖ũ_v‖²) join the active set S, the quadratic ½ c_Sᵀ Q c_S − b_Sᵀ c_S with
Q = (Ũ_S Ũ_Sᵀ)∘(Ũ_S Ũ_Sᵀ) (Hadamard square), b_v = ũ_vᵀ PGP ũ_v is solved exactly (Cholesky) on S with
negative entries dropped, and again, until no token violates the KKT conditions (or 60 rounds / 6,000
active tokens). The estimate is rounded to integers.

What the coordinator holds, case by case (3 sites, weights 1):
- plain:          site 1's own G₀ (float32, as `medmerge stats` writes it);
- secure:         S = G₀¹ + G₀² + G₀³; the estimate of site 1's counts is the NNLS solution of S (the
                  attacker does not know the others' counts);
- secure+adapters: S, and RegMean's other sums S_WG = Σ_i ΔW_i G₀ⁱ and S_WD = Σ_i ΔW_i diag(G₀ⁱ) for
                  layer 0's q, k, v, with the LoRA adapters ΔW_i = s·B_i A_i that the coordinator also
                  holds: stacking [B_1 B_2 B_3] (out × 3r, full column rank) gives every A_i G₀ⁱ and
                  diag(G₀ⁱ) by least squares, i.e. 3·3r·576 + 576 linear measurements of site 1's c alone;
                  NNLS on those (Q_vw = (A u_v·A u_w)(u_v·u_w) + (u_v²·u_w²));
- secure+dp:      S and the S_WG, S_WD above with N(0, σ²C²) on every released coordinate (the sum's
                  distributed noise, in the coordinates x / D of the public input scale D: D N D on S,
                  N D on the W·G sums; the Grams themselves unclipped, which only helps the attacker);
- public prior:   no statistics at all: PubMedQA's token frequencies scaled to the site's token count
                  (chance level for the top-100 precision).
Scores for site 1: exact-count share (of the tokens it used, how many have their count recovered
exactly), false tokens (estimated ≥ 1, never used), top-100 precision (its 100 most frequent tokens among
the estimate's 100 largest), and the L1 error Σ|ĉ − c| / Σc.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medmerge.models import load_model, load_tokenizer, model_kind
from medmerge.threads import use_threads
from medmerge.train.examples import prepare_data
from medmerge.train.statistics import GRAM_EXAMPLES, expert_train_config


def token_vectors(expert: Path) -> torch.Tensor:
    """U (V, hidden) float64: layer 0's input RMSNorm(E_v)·γ of every vocabulary entry."""
    model = load_model(expert).eval()
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight.float()
        return model.model.layers[0].input_layernorm(embedding).double()


def site_counts(expert: Path, examples: int, vocab: int) -> torch.Tensor:
    """Token counts (V,) of the questions `medmerge stats` reads for this expert (its seeded sample)."""
    config, _ = expert_train_config(expert, None)
    data = prepare_data(config, load_tokenizer(expert), model_kind(expert))
    n = min(len(data.train), examples)
    order = random.Random(config.seed).sample(range(len(data.train)), n)
    ids = torch.tensor([t for i in order for t in data.train[i]["input_ids"]])
    return torch.bincount(ids, minlength=vocab).double()


def public_counts(expert: Path, vocab: int) -> torch.Tensor:
    """Token counts of PubMedQA's questions and contexts (the public prior)."""
    from medmerge.data import load_dataset

    tokenizer = load_tokenizer(expert)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for pair in load_dataset("pubmedqa").pairs:
        ids = tokenizer(pair.question + " " + pair.answer)["input_ids"]
        counts += torch.bincount(torch.tensor(ids), minlength=vocab).double()
    return counts


def public_scale(expert: Path, u: torch.Tensor, examples: int = 32) -> torch.Tensor:
    """Layer 0's public input scale D (bench/secure_regmean.py's, train.statistics.input_scales): from
    the first PubMedQA questions with their long answers, encoded as the sites encode (64 + 64 tokens)."""
    from medmerge.data import encode_pair, load_dataset

    tokenizer = load_tokenizer(expert)
    pairs = load_dataset("pubmedqa").pairs[:examples]
    ids = [
        t for p in pairs for t in encode_pair(p.question, p.answer, tokenizer, "causal", 64, 64)["input_ids"]
    ]
    counts = torch.bincount(torch.tensor(ids), minlength=u.shape[0]).double()
    d = ((counts[:, None] * u * u).sum(0) / counts.sum()).sqrt()
    return d.clamp(min=1e-3 * float(d.max()))


def gram(u: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Uᵀ diag(c) U, rounded to float32 as a stored Gram is (returned as float64)."""
    used = counts > 0
    rows = u[used]
    return ((rows * counts[used, None]).T @ rows).float().double()


def _polish(q: torch.Tensor, b: torch.Tensor, rounds: int = 50) -> torch.Tensor:
    """min ½xᵀQx − bᵀx over the active set, non-negative: the least-squares solution (Cholesky), its
    negative entries dropped and solved again until none is left (0 where dropped)."""
    support = torch.ones(len(b), dtype=torch.bool)
    out = torch.zeros_like(b)
    for _ in range(rounds):
        idx = support.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        sub = q[idx][:, idx]
        sub = sub + 1e-12 * float(sub.diagonal().mean()) * torch.eye(len(idx), dtype=q.dtype)
        factor, info = torch.linalg.cholesky_ex(sub)
        x = torch.cholesky_solve(b[idx, None], factor).squeeze(1) if int(info) == 0 else None
        if x is None:
            x = torch.linalg.lstsq(sub, b[idx, None]).solution.squeeze(1)
        negative = x < 0
        if not bool(negative.any()):
            out[idx] = x
            return out
        support[idx[negative]] = False
    return out


def nnls(
    block: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    column_norms: torch.Tensor,
    add: int = 300,
    rounds: int = 60,
    max_active: int = 6000,
) -> tuple[torch.Tensor, dict]:
    """Non-negative least squares over the whole vocabulary by a block active set (Lawson–Hanson,
    `add` variables at a time): add the tokens whose gradient is most negative (scaled by their
    column's norm), solve on the active set (`_polish`), keep the positive ones, recompute the gradient
    on every token; stop when no token violates the KKT conditions (gradient ≥ −tol where c = 0).
    `block(S)` gives (Q_SS, b_S), `gradient(S, c_S)` the (V,) gradient of ½‖Φc − m‖²."""
    vocab = len(column_norms)
    estimate = torch.zeros(vocab, dtype=torch.float64)
    active = torch.zeros(vocab, dtype=torch.bool)
    grad = gradient(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64))
    tol = 1e-7 * float((-grad).max())
    record = {"rounds": 0}
    for _ in range(rounds):
        violators = (~active) & (grad < -tol)
        if not bool(violators.any()) or int(active.sum()) >= max_active:
            break
        score = (-grad / column_norms).masked_fill(~violators, -float("inf"))
        active[score.topk(min(add, int(violators.sum()))).indices] = True
        idx = active.nonzero().squeeze(1)
        q, b = block(idx)
        estimate = torch.zeros(vocab, dtype=torch.float64)
        estimate[idx] = _polish(q, b)
        active = estimate > 0
        idx = active.nonzero().squeeze(1)
        grad = gradient(idx, estimate[idx])
        record["rounds"] += 1
    record["active"] = int(active.sum())
    record["kkt_violators_left"] = int(((~active) & (grad < -tol)).sum())
    return estimate, record


def whitening(u: torch.Tensor) -> torch.Tensor:
    """P = M^(-1/2), M = Σ_v u_v u_vᵀ / V: P u_v are nearly orthogonal on average, which makes the
    gradient single out the tokens that occur (the solution is the same; the residual is weighed by P)."""
    values, vectors = torch.linalg.eigh(u.T @ u / u.shape[0])
    return (vectors * values.clamp(min=1e-12 * float(values.max())).rsqrt()) @ vectors.T


def attack_gram(u: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """NNLS of c from G = Uᵀ diag(c) U (+ noise), in whitened coordinates: P G P = Σ c_v (Pu_v)(Pu_v)ᵀ."""
    uw, gw = u @ p, p @ g @ p

    def block(idx):
        k = uw[idx] @ uw[idx].T
        return k * k, ((uw[idx] @ gw) * uw[idx]).sum(1)

    def gradient(idx, c):
        residual = (uw[idx] * c[:, None]).T @ uw[idx] - gw
        return ((uw @ residual) * uw).sum(1)

    return nnls(block, gradient, (uw * uw).sum(1))


def attack_projections(
    u: torch.Tensor, a: torch.Tensor, y: torch.Tensor, diagonal: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """NNLS of c from Y = A Uᵀ diag(c) U (k × hidden) and diag(G) = Σ_v c_v u_v² (hidden); the first
    in whitened coordinates (Y P = (A P⁻¹)(P G P))."""
    uw = u @ p
    au = u @ a.T  # (V, k): A u_v = (A P⁻¹)(P u_v)
    yw = y @ p
    sq = u * u

    def block(idx):
        q = (au[idx] @ au[idx].T) * (uw[idx] @ uw[idx].T) + sq[idx] @ sq[idx].T
        return q, ((au[idx] @ yw) * uw[idx]).sum(1) + sq[idx] @ diagonal

    def gradient(idx, c):
        r_y = (au[idx] * c[:, None]).T @ uw[idx] - yw
        r_d = sq[idx].T @ c - diagonal
        return ((au @ r_y) * uw).sum(1) + sq @ r_d

    norms = ((au * au).sum(1) * (uw * uw).sum(1) + (sq * sq).sum(1)).sqrt()
    return nnls(block, gradient, norms)


def layer0_adapters(expert: Path) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A of layer 0's q, k, v from the adapter file (what the coordinator holds)."""
    from safetensors.torch import load_file

    config = json.loads((expert / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    tensors = load_file(str(expert / "adapter_model.safetensors"))
    out = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        stem = f"base_model.model.model.layers.0.self_attn.{proj}"
        out[proj] = (
            tensors[f"{stem}.lora_B.weight"].double() * scale,
            tensors[f"{stem}.lora_A.weight"].double(),
        )
    return out


def recover_site_terms(
    adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    s_wg: dict[str, torch.Tensor],
    s_wd: dict[str, torch.Tensor],
    site: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the coordinator solves for from RegMean's sums and the adapters it holds: site's stacked
    A (3r × hidden), A·G₀ (3r × hidden) and diag(G₀) (hidden), by least squares on [B_1 … B_K]."""
    rows_a, rows_y, diagonals = [], [], []
    for proj, total in s_wg.items():
        b = torch.cat([ad[proj][0] for ad in adapters], dim=1)  # (out, K r)
        r = adapters[0][proj][0].shape[1]
        solved = torch.linalg.lstsq(b, total).solution  # (K r, hidden): every A_i G_i
        mine = slice(site * r, (site + 1) * r)
        a = adapters[site][proj][1]
        rows_a.append(a)
        rows_y.append(solved[mine])
        solved_d = torch.linalg.lstsq(b, s_wd[proj]).solution[mine]  # A_i diag(G_i)
        diagonals.append((a * solved_d).sum(0) / (a * a).sum(0))  # column j: A[:, j]·g_j
    return torch.cat(rows_a), torch.cat(rows_y), torch.stack(diagonals).mean(0)


def scores(estimate: torch.Tensor, truth: torch.Tensor) -> dict:
    rounded = estimate.round().clamp(min=0)
    used = truth > 0
    top_true = set(truth.topk(100).indices.tolist())
    top_est = set(estimate.topk(100).indices.tolist())
    return {
        "exact_count_share": float((rounded[used] == truth[used]).double().mean()),
        "false_tokens": int(((rounded >= 1) & ~used).sum()),
        "top100_precision": len(top_true & top_est) / 100,
        "l1_error": float((estimate - truth).abs().sum() / truth.sum()),
    }


def _symmetric_noise(size: int, std: float, generator: torch.Generator) -> torch.Tensor:
    upper = torch.randn(size, size, dtype=torch.float64, generator=generator).triu() * std
    return upper + upper.triu(1).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "experts", type=Path, nargs=3, help="three LoRA experts (sites); the first is attacked"
    )
    parser.add_argument("--examples", type=int, default=GRAM_EXAMPLES, help="questions per site's Gram")
    parser.add_argument("--clip", type=float, default=None, help="C of secure+dp (noise std σC)")
    parser.add_argument("--sigmas", type=float, nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--check-statistics", action="store_true", help="compare with the site's statistics file"
    )
    parser.add_argument("--only-dp", action="store_true", help="skip the noise-free cases")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    use_threads(args.threads)
    started = time.perf_counter()
    u = token_vectors(args.experts[0])
    vocab = u.shape[0]
    counts = [site_counts(e, args.examples, vocab) for e in args.experts]
    grams = [gram(u, c) for c in counts]
    truth = counts[0]
    result: dict = {
        "vocabulary": vocab,
        "examples": args.examples,
        "site_tokens": [int(c.sum()) for c in counts],
        "site_distinct_tokens": [int((c > 0).sum()) for c in counts],
        "site1_tokens_no_other_site_uses": float(((counts[1] + counts[2])[truth > 0] == 0).double().mean()),
        "cases": {},
    }
    if args.check_statistics:
        from medmerge.site_stats import SiteStatistics

        with SiteStatistics.open(args.experts[0]) as stats:
            stored = stats.read("gram", "model.layers.0.self_attn.q_proj.weight").double()
        result["model_gram_vs_counts_rel_error"] = float((stored - grams[0]).norm() / stored.norm())

    def run(name: str, attack: Callable[[], tuple[torch.Tensor, dict]]) -> None:
        t = time.perf_counter()
        estimate, record = attack()
        result["cases"][name] = {
            **scores(estimate, truth),
            **record,
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(name, json.dumps(result["cases"][name]), flush=True)

    total = grams[0] + grams[1] + grams[2]
    whiten = whitening(u)
    if not args.only_dp:
        run("plain", lambda: attack_gram(u, grams[0], whiten))
        run("secure", lambda: attack_gram(u, total, whiten))
    adapters = [layer0_adapters(e) for e in args.experts]
    s_wg = {
        p: sum(ad[p][0] @ ad[p][1] @ g for ad, g in zip(adapters, grams, strict=True)) for p in adapters[0]
    }
    s_wd = {
        p: sum(ad[p][0] @ ad[p][1] * g.diagonal() for ad, g in zip(adapters, grams, strict=True))
        for p in adapters[0]
    }
    a, y, diagonal = recover_site_terms(adapters, s_wg, s_wd, 0)
    result["adapter_recovery_rel_error"] = float((y - a @ grams[0]).norm() / (a @ grams[0]).norm())
    if not args.only_dp:
        run("secure+adapters", lambda: attack_projections(u, a, y, diagonal, whiten))
    gen = torch.Generator().manual_seed(1)  # the bench's noise: a stand-in for the sites' secret draws
    d = public_scale(args.experts[0], u) if args.clip else None
    for sigma in args.sigmas if args.clip else []:
        std = sigma * args.clip  # per released coordinate: x / D
        noisy = total + _symmetric_noise(total.shape[0], std, gen) * d[:, None] * d[None, :]
        result.setdefault("noise_std", {})[str(sigma)] = std
        run(f"secure+dp σ={sigma:g}", lambda noisy=noisy: attack_gram(u, noisy, whiten))
        noisy_wg = {
            p: t + std * torch.randn(t.shape, dtype=torch.float64, generator=gen) * d for p, t in s_wg.items()
        }
        noisy_wd = {
            p: t + std * torch.randn(t.shape, dtype=torch.float64, generator=gen) * d for p, t in s_wd.items()
        }
        a, y, diagonal = recover_site_terms(adapters, noisy_wg, noisy_wd, 0)
        run(
            f"secure+dp+adapters σ={sigma:g}",
            lambda a=a, y=y, diagonal=diagonal: attack_projections(u, a, y, diagonal, whiten),
        )
    prior = public_counts(args.experts[0], vocab)
    prior = prior * (truth.sum() / prior.sum())
    result["cases"]["public prior"] = scores(prior, truth)
    print("public prior", json.dumps(result["cases"]["public prior"]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load"] = Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
