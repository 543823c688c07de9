"""Poisoning, measured on the real model: three sites, one of them dishonest, the coordinator's defences.

Three sites on real data, as configs/federated-demo.yaml trains them (SmolLM2-135M, LoRA r 16 α 32 on all
linears, 40 steps of batch 8, 128 + 128 tokens, 800 training pairs): MedQuAD split by source collection
into two institutions, and GenMedGPT-5k. Their experts are trained once and cached in --work. Then the
same merge search (task arithmetic and TIES, --trials Optuna TPE trials each, seed 0, the coordinator's
default trial first) is run on what the sites send:

    honest     the three experts as trained
    x1000      the --attacker site's adapter with B ×1000 (ΔW ×1000): what a site can send today
    flip       its adapter with B negated (ΔW → −ΔW): the same norms, the opposite direction

with three defences:

    none       the adapters as sent, merged unchecked (the coordinator before the screen was wired)
    default    the coordinator's screen, federated.screening.screen_contributions with the study's
               federation.robust defaults (what coordinator._train calls): checks.validate_adapter, the
               norm screen (an outsized site scaled back, outlier modules clipped), the direction screen
               (a site pointing against most others refused), the adapters re-serialised canonically
    refuse     the same with federation.robust.refuse_share 0.5: a site that is a norm outlier in over
               half its modules is refused instead of scaled back

The search is the coordinator's: medmerge.merge.search.search (the study's sampler and seed, the default
trial first), each trial's objective federated.verdict.objective of the scoring sites' {Σ nll, tokens}
(federation.objective "tokens", weight_cap 2), computed here as each site computes it
(medmerge.evaluate.scorer on its first --validation validation questions). A refused site leaves the
study: its questions do not score the search. The chosen merge is the method with the lowest objective
(as the verdict chooses it). Its validation loss is reported over all three sites' questions and over the
two honest sites'; the acceptance compares the chosen merge with the honest study's (default defence, no
attacker), in nats/token. The poisoned site scores honestly: this isolates what its ADAPTER can do.
Also measured: the honest experts' norm ratios and pairwise cosines, each adapter alone at every site
(robust.validation_screen's data), and, with --statistics, the sites' Gram scales through the same
screen_contributions (check_statistics with the study's bounds, then screen_gram_scales).

The merges are built by medmerge.merge from the adapter folders the screen keeps (canonical bytes).

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/poisoning.py --statistics [--work runs/poisoning]
    (writes --work/poisoning-<attacker>.json and prints the tables)
    .venv/bin/python bench/poisoning.py --stage train      # only train (and cache) the three experts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

SITES = {
    "cancer-genetics": "medquad?collections=1_CancerGov_QA,2_GARD_QA,3_GHR_QA",
    "nih-institutes": "medquad?collections=4_MPlus_Health_Topics_QA,5_NIDDK_QA,6_NINDS_QA,"
    "7_SeniorHealth_QA,8_NHLBI_QA_XML,9_CDC_QA",
    "chatdoctor": "genmedgpt",
}


def study_config(args: argparse.Namespace):
    """The federated study the bench stands for (configs/federated-demo.yaml's sizes, three sites)."""
    from medmerge.federated.config import FederatedConfig

    return FederatedConfig.model_validate(
        {
            "base_model": "smollm2-135m",
            "threads": args.threads,
            "sites": [{"name": n, "data": [spec]} for n, spec in SITES.items()],
            "train_examples": 800,
            "train": {
                "method": "lora",
                "max_steps": args.steps,
                "batch_size": 8,
                "grad_accum": 1,
                "warmup_steps": 4,
                "learning_rate": 1.0e-3,
                "max_prompt_tokens": 128,
                "max_answer_tokens": 128,
                "eval_every": 0,
                "checkpoint_every": 0,
            },
            "methods": ["task_arithmetic", "ties"],
            "search": {
                "trials": args.trials,
                "validation_examples": args.validation,
                "max_prompt_tokens": 128,
                "max_answer_tokens": 128,
                "seed": 0,
            },
            "federation": {"fedavg": {"rounds": 0}},
        }
    )


def train_experts(config, work: Path) -> dict[str, Path]:
    """Each site's expert, trained as federated.site.Site.train trains it (cached by its config's hash)."""
    from medmerge.train import train_expert

    folders = {}
    for site in config.sites:
        train = config.train_config(site.data)
        folder, key_file = work / "experts" / site.name, work / "experts" / f"{site.name}.key"
        key = hashlib.sha256(train.model_dump_json().encode()).hexdigest()
        if not (folder.is_dir() and key_file.is_file() and key_file.read_text() == key):
            started = time.time()
            train_expert(train, folder, overwrite=True, progress=False)
            key_file.write_text(key)
            print(f"trained {site.name}: {time.time() - started:.0f} s", flush=True)
        folders[site.name] = folder
    return folders


class Scorer:
    """Each site's validation loss of a model, on the batches federated.site.validation_batches encodes
    at the site: the first `search.validation_examples` validation pairs of its SPECs, answer NLL
    summed (nats) and answer tokens counted, on one resident base model whose weights are replaced by
    each merge."""

    def __init__(self, config) -> None:
        from medmerge.federated.site import validation_batches
        from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model

        self.base = resolve_model(config.base_model)
        tokenizer, kind = load_tokenizer(self.base), model_kind(self.base)
        self.batches = {
            site.name: validation_batches(config, site.data, tokenizer, kind) for site in config.sites
        }
        self.model = load_model(self.base)
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def __call__(self, state: dict[str, Any] | None) -> dict[str, dict[str, float]]:
        """{site: {nll_sum, tokens}} of the base (None) or of merged weights `state`."""
        from medmerge.evaluate.scorer import load_weights, per_question_loss

        load_weights(self.model, self.base_state if state is None else state)
        out = {}
        for site, (batches, order) in self.batches.items():
            nll, tokens = per_question_loss(self.model, batches, order)
            out[site] = {"nll_sum": float(sum(nll)), "tokens": int(sum(tokens))}
        return out


def pooled(numbers: dict[str, dict[str, float]], sites: list[str]) -> float:
    """Token-weighted validation loss (nats/token) over `sites`."""
    return sum(numbers[s]["nll_sum"] for s in sites) / sum(numbers[s]["tokens"] for s in sites)


def _folder_digest(folder: Path) -> str:
    """SHA-256 of what an adapter folder means: its tensors (names, dtypes, values) and its scale's
    fields; the same adapter re-serialised with the canonical config has the same digest."""
    import torch
    from safetensors.torch import load

    config = json.loads((folder / "adapter_config.json").read_text())
    digest = hashlib.sha256(json.dumps([config.get(k) for k in ("r", "lora_alpha", "use_rslora")]).encode())
    for name, tensor in sorted(load((folder / "adapter_model.safetensors").read_bytes()).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class Cache:
    """Scores by (model digest): a rerun of the bench re-scores nothing it has scored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)
        return self.data[key]


def merge_state(config, recipe: dict[str, Any], folders: list[Path]) -> dict[str, Any]:
    """The merged weights of a federated recipe over expert folders, as the coordinator and sites build
    them (medmerge.merge.merged_state of the recipe's MergeConfig: merge.recipe.Recipe where the protocol
    rewrite has landed, federated.site.recipe_config before)."""
    from medmerge.merge import merged_state

    try:
        from medmerge.merge.recipe import Recipe
    except ImportError:
        from medmerge.federated.site import recipe_config

        return merged_state(recipe_config(recipe, config.base_model, [str(f) for f in folders]))
    named = dict(zip(recipe["experts"], map(str, folders), strict=True))
    return merged_state(Recipe.model_validate(recipe).merge_config(config.base_model, named))


def search(config, method: str, experts: dict[str, Path], scorers: list[str], scorer: Scorer, cache: Cache):
    """The coordinator's search (coordinator._search: medmerge.merge.search.search, objective
    verdict.objective over the `scorers`' numbers), each trial's merge scored here as the sites score
    it. Returns the trials and the best one."""
    from medmerge.federated.verdict import objective
    from medmerge.merge.search import Scored
    from medmerge.merge.search import search as merge_search

    federation, names = config.federation, list(experts)
    digests = [_folder_digest(experts[n]) for n in names]

    def score(recipes, first: int) -> list:
        out = []
        for recipe in recipes:
            wire = recipe.model_dump(mode="json")
            key = hashlib.sha256(json.dumps([wire, digests], sort_keys=True).encode()).hexdigest()
            numbers = cache.get(key, lambda r=wire: scorer(merge_state(config, r, list(experts.values()))))
            mine = {s: numbers[s] for s in scorers}
            out.append(Scored(objective(mine, federation.objective, federation.weight_cap), numbers))
        return out

    result = merge_search(method, names, config.search, score)
    trials = [
        {"trial": t.number, "recipe": t.recipe.model_dump(mode="json"), "loss": t.loss, "sites": t.details}
        for t in result.trials
    ]
    return trials, trials[result.best.number]


def write_adapter_folder(folder: Path, blobs: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    return folder


def poisoned(blobs: dict[str, bytes], factor: float) -> dict[str, bytes]:
    """The site's adapter with every lora_B × factor: ΔW × factor (1000: the norm attack; −1: the sign
    flip). Its config is the honest one."""
    from safetensors.torch import load, save

    tensors = load(blobs["adapter_model.safetensors"])
    scaled = {k: v * factor if ".lora_B." in k else v for k, v in tensors.items()}
    return blobs | {"adapter_model.safetensors": save(scaled)}


def defend(study, sent: dict[str, dict[str, bytes]], work: Path, settings, base_id: str):
    """What the coordinator keeps of the sites' adapters: federated.screening.screen_contributions (the
    function coordinator._train calls) with `settings` (federation.robust). Returns {site: folder kept,
    canonical bytes}, the lines naming sites (refused or bounded) and the screen's record."""
    from medmerge.federated.screening import screen_contributions

    screening = screen_contributions(sent, study, settings, base_id)
    named = [f"{s} refused: {why}" for s, why in screening.refused.items()]
    named += [f"{s} kept, bounded: {how}" for s, how in screening.bounded.items()]
    folders = {site: write_adapter_folder(work / site, blobs) for site, blobs in screening.kept.items()}
    return folders, named, screening.record()


def measure(args: argparse.Namespace, config, experts: dict[str, Path]) -> dict[str, Any]:
    """The honest experts' norm ratios and direction cosines (which choose K_NORM and the direction rule),
    each expert alone at every site (the validation screen), then the searches of every scenario."""
    from medmerge.federated.checks import lora_study, validate_adapter
    from medmerge.federated.robust import direction_cosines, module_norms, reference
    from medmerge.models import resolve_model

    study = lora_study(config.train.lora, resolve_model(config.base_model), config.base_model)
    sites = [s.name for s in config.sites]
    honest = {s: {f: (experts[s] / f).read_bytes() for f in ADAPTER_FILES} for s in sites}
    checked = {
        s: validate_adapter(s, b["adapter_config.json"], b["adapter_model.safetensors"], study)
        for s, b in honest.items()
    }
    norms = module_norms(checked)
    ratios = sorted(
        norms[s][m] / reference({t: norms[t][m] for t in sites}, s) for s in sites for m in study.modules
    )
    pair_ratio = max(
        max(norms[a][m], norms[b][m]) / min(norms[a][m], norms[b][m])
        for a in sites
        for b in sites
        if a < b
        for m in study.modules
    )
    cosines = direction_cosines(checked)
    started = time.time()
    scorer, cache = Scorer(config), Cache(args.work / "scores.json")
    print(f"scorer ready: {time.time() - started:.0f} s", flush=True)

    base = cache.get("base", lambda: scorer(None))

    def screen_alone(name: str, folder: Path) -> dict[str, Any]:
        """Each site's numbers of one expert alone (task arithmetic λ 1 of that adapter: base + ΔW), and
        the base's."""
        recipe = {"method": "task_arithmetic", "parameters": {"lambda": 1.0}, "weights": [1.0], "seed": 0}
        recipe["experts"] = [name]
        key = hashlib.sha256(json.dumps([recipe, _folder_digest(folder)]).encode()).hexdigest()
        return {"base": base, "alone": cache.get(key, lambda: scorer(merge_state(config, recipe, [folder])))}

    attacker = args.attacker
    sent_by = {
        "honest": honest,
        "x1000": honest | {attacker: poisoned(honest[attacker], 1000.0)},
        "flip": honest | {attacker: poisoned(honest[attacker], -1.0)},
    }
    # each adapter alone, as sent (honest, x1000, flipped), at every site: the validation screen's data
    alone_as_sent = {}
    for case, sent in sent_by.items():
        for site, blobs in sent.items():
            if case == "honest" or site == attacker:
                label = site if case == "honest" else f"{site} {case}"
                folder = write_adapter_folder(args.work / "alone" / label.replace(" ", "-"), blobs)
                numbers = screen_alone(site, folder)["alone"]
                alone_as_sent[label] = {
                    s: numbers[s]["nll_sum"] / numbers[s]["tokens"] - base[s]["nll_sum"] / base[s]["tokens"]
                    for s in sites
                }
    print(json.dumps({"alone_minus_base": alone_as_sent}), flush=True)
    from medmerge.federated.config import RobustSettings

    rows, screens = [], {}
    for case, sent in sent_by.items():
        for defence in ("none", "default", "refuse"):
            if case == "honest" and defence == "refuse":
                continue
            work = args.work / "cases" / f"{case}-{defence}"
            if defence == "none":
                folders = {s: write_adapter_folder(work / s, b) for s, b in sent.items()}
                named = []
            else:
                settings = RobustSettings(refuse_share=0.5 if defence == "refuse" else None)
                folders, named, screens[f"{case}-{defence}"] = defend(
                    study, sent, work, settings, config.base_model
                )
            scorers = [s for s in sites if s in folders]  # a refused site left the study
            for method in config.methods:
                started = time.time()
                trials, best = search(config, method, folders, scorers, scorer, cache)
                rows.append(
                    {
                        "case": case,
                        "defence": defence,
                        "method": method,
                        "experts": list(folders),
                        "best_recipe": best["recipe"],
                        "objective": best["loss"],
                        "val_loss_all_sites": pooled(best["sites"], sites),
                        "val_loss_honest_sites": pooled(best["sites"], [s for s in sites if s != attacker]),
                        "named": named,
                        "trials": [
                            (t["recipe"]["weights"], t["recipe"]["parameters"], t["loss"]) for t in trials
                        ],
                        "seconds": round(time.time() - started, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return {
        "attacker": attacker,
        "honest_norm_ratio_to_reference": {
            "max": ratios[-1],
            "p99": ratios[int(0.99 * (len(ratios) - 1))],
            "min": ratios[0],
        },
        "honest_norm_max_pairwise_ratio": pair_ratio,
        "honest_cosines": {f"{a}~{b}": c for (a, b), c in cosines.items()},
        "base": base,
        "alone_minus_base": alone_as_sent,
        "screens": screens,
        "rows": rows,
    }


def gram_scales(args: argparse.Namespace, config, experts: dict[str, Path]) -> dict[str, Any]:
    """Each honest site's Gram statistics (medmerge.train.statistics, the study's statistics settings: 64
    training questions), shared as federated.site shares them and checked by checks.check_statistics:
    the spread of trace/tokens (mean ‖x‖² per Linear input) across honest sites, which chooses
    robust.K_GRAM, and whether a ×1000 Gram is refused by screen_gram_scales."""
    from medmerge.federated.checks import base_shapes, check_statistics
    from medmerge.federated.robust import reference, screen_gram_scales
    from medmerge.models import resolve_model
    from medmerge.site_stats import INFO_FILE, TENSORS_FILE
    from medmerge.train.statistics import compute_statistics

    try:
        from medmerge.federated.site import SHARED_RECORD
    except ImportError:  # what of statistics.json a site shares (federated.site before the protocol rewrite)
        SHARED_RECORD = (
            "format",
            "kinds",
            "dtype",
            "bytes",
            "sha256",
            "aliases",
            "examples",
            "tokens",
            "per_kind",
        )
    settings, shapes, summaries, blobs = (
        config.federation.statistics,
        base_shapes(resolve_model(config.base_model)),
        {},
        {},
    )
    for site, expert in experts.items():
        out = args.work / "statistics" / site
        if not (out / INFO_FILE).is_file():
            started = time.time()
            compute_statistics(
                expert,
                config.site(site).data,
                kinds=["gram"],
                out_dir=out,
                overwrite=True,
                progress=False,
                **settings.arguments(),
            )
            print(f"statistics of {site}: {time.time() - started:.0f} s", flush=True)
        record = {k: v for k, v in json.loads((out / INFO_FILE).read_text()).items() if k in SHARED_RECORD}
        blobs[site] = {
            TENSORS_FILE: (out / TENSORS_FILE).read_bytes(),
            INFO_FILE: json.dumps(record).encode(),
        }
        summaries[site] = check_statistics(site, blobs[site], shapes, ["gram"]).mean_sq_norm
    names = sorted(set.intersection(*(set(v) for v in summaries.values())))
    ratios = sorted(
        summaries[s][n] / reference({t: summaries[t][n] for t in summaries}, s)
        for s in summaries
        for n in names
    )
    inflated = {s: dict(v) for s, v in summaries.items()}
    attacker = args.attacker
    inflated[attacker] = {n: v * 1000 for n, v in inflated[attacker].items()}
    # the coordinator's screen itself, on the honest adapters with the attacker's Grams ×1000 (record
    # made consistent again): refused by screen_gram_scales, nothing else
    from safetensors.torch import load, save

    from medmerge.federated.checks import StatisticsBounds, lora_study
    from medmerge.federated.config import RobustSettings
    from medmerge.federated.screening import screen_contributions

    tensors = load(blobs[attacker][TENSORS_FILE])
    data = save({k: v * 1000 if k.startswith("gram") else v for k, v in tensors.items()})
    record = json.loads(blobs[attacker][INFO_FILE]) | {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    poisoned = blobs | {attacker: {TENSORS_FILE: data, INFO_FILE: json.dumps(record).encode()}}
    train, base = config.train, resolve_model(config.base_model)
    bounds = StatisticsBounds.for_study(settings.examples, train.max_prompt_tokens, train.max_answer_tokens)
    adapters = {s: {f: (experts[s] / f).read_bytes() for f in ADAPTER_FILES} for s in experts}
    screening = screen_contributions(
        adapters,
        lora_study(train.lora, base, config.base_model),
        RobustSettings(),
        config.base_model,
        statistics=poisoned,
        shapes=shapes,
        kinds=["gram"],
        bounds=bounds,
    )
    return {
        "tokens": {s: json.loads(b[INFO_FILE])["tokens"] for s, b in blobs.items()},
        "max_tokens": bounds.max_tokens,
        "honest_ratio_to_reference": {"min": ratios[0], "max": ratios[-1]},
        "honest_refused": screen_gram_scales(summaries),
        "x1000_refused": screen_gram_scales(inflated),
        "x1000_screen_contributions": screening.refused,
    }


def table(result: dict[str, Any]) -> str:
    """The markdown table of every search: each method's best validation loss per case and defence."""
    honest = {r["method"]: r for r in result["rows"] if r["case"] == "honest" and r["defence"] == "default"}
    lines = [
        "| case | defence | method | experts merged | val loss, all 3 sites | vs honest "
        "| val loss, 2 honest sites | vs honest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        h = honest[r["method"]]
        lines.append(
            f"| {r['case']} | {r['defence']} | {r['method']} | {len(r['experts'])} | "
            f"{r['val_loss_all_sites']:.4f} | "
            f"{r['val_loss_all_sites'] - h['val_loss_all_sites']:+.4f} | {r['val_loss_honest_sites']:.4f} | "
            f"{r['val_loss_honest_sites'] - h['val_loss_honest_sites']:+.4f} |"
        )
    return "\n".join(lines)


def chosen(result: dict[str, Any], case: str, defence: str) -> dict[str, Any]:
    """The chosen merge of a case: the method whose best trial has the lowest objective (the verdict's
    choice)."""
    rows = [r for r in result["rows"] if r["case"] == case and r["defence"] == defence]
    return min(rows, key=lambda r: r["objective"])


def acceptance(result: dict[str, Any], case: str, bound: float = 0.01) -> str:
    """Honest study vs `case`: the chosen merge (method, experts merged), its validation loss over the
    three sites' questions and over the two honest sites', the difference to the honest study's, and
    the sites the screen named."""
    honest = chosen(result, "honest", "default")
    lines = [
        f"| study | defence | chosen merge | experts | val loss, 3 sites | Δ vs honest "
        f"| val loss, 2 honest sites | Δ vs honest | within {bound} | site named |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, defence in (("honest", "default"), (case, "none"), (case, "default"), (case, "refuse")):
        r = chosen(result, label, defence)
        d_all = r["val_loss_all_sites"] - honest["val_loss_all_sites"]
        d_honest = r["val_loss_honest_sites"] - honest["val_loss_honest_sites"]
        ok = "yes" if abs(d_all) <= bound and abs(d_honest) <= bound else "no"
        named = "<br>".join(r["named"]) or "—"
        lines.append(
            f"| {label} | {defence} | {r['method']} | {len(r['experts'])} | {r['val_loss_all_sites']:.4f} "
            f"| {d_all:+.4f} | {r['val_loss_honest_sites']:.4f} | {d_honest:+.4f} | "
            f"{'—' if label == 'honest' else ok} | {named} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "poisoning")
    parser.add_argument("--stage", choices=["train", "all"], default="all")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--validation", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attacker", default="nih-institutes", choices=list(SITES))
    parser.add_argument("--statistics", action="store_true", help="also measure the sites' Gram scales")
    args = parser.parse_args(argv)

    from medmerge.threads import use_threads

    use_threads(args.threads)
    config = study_config(args)
    args.work.mkdir(parents=True, exist_ok=True)
    experts = train_experts(config, args.work)
    if args.stage == "train":
        print(json.dumps({k: str(v) for k, v in experts.items()}))
        return 0
    started = time.time()
    result = measure(args, config, experts)
    if args.statistics:
        result["statistics"] = gram_scales(args, config, experts)
        print(json.dumps(result["statistics"], indent=1))
    result["seconds"] = round(time.time() - started, 1)
    out = args.work / f"poisoning-{args.attacker}.json"
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    for case in ("x1000", "flip"):
        print(f"\nhonest vs {case} (attacker {args.attacker}):\n")
        print(acceptance(result, case))
    print(f"written {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
