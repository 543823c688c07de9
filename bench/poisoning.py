"""Poisoning, measured on the real model: three sites, one of them dishonest, the coordinator's defences.

Three sites on real data, as configs/federated-demo.yaml trains them (SmolLM2-135M, LoRA r 16 α 32 on all
linears, 40 steps of batch 8, 128 + 128 tokens): MedQuAD split by source collection into two
institutions, and GenMedGPT-5k. Their experts are trained once and cached in --work. Then the same merge
search (task arithmetic and TIES, --trials Optuna TPE trials each, seed 0, the coordinator's default
trial first) is run on:

    honest     the three experts as trained
    x1000      one site's adapter with B ×1000 (ΔW ×1000): what a site can send today
    flip       one site's adapter with B negated (ΔW → −ΔW): the same norms, the opposite direction

each once as the coordinator takes it today (no defence) and once through medmerge.federated.checks and
.robust (validate_adapter, screen_norms / clip, and the direction and validation screens). A recipe's
validation loss is the token-weighted answer NLL (nats/token) of every site's --validation validation
questions, computed here as each site would (medmerge.evaluate.scorer), from the site's own data; it
is also reported over the honest sites only. The poisoned site scores honestly: this bench isolates
what its ADAPTER can do (its self-reported numbers are bounded by robust.cap_objective).

The merges are built by medmerge.merge from the adapters the coordinator keeps (after the defence: the
validated, re-serialised and clipped adapter; or none for a refused site): the search runs on these
functions directly, not through medmerge.federated.coordinator (`--coordinator` is reserved for the
protocol rewrite that wires them in).

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/poisoning.py [--work runs/poisoning]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "poisoning")
    parser.add_argument("--stage", choices=["train", "all"], default="all")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--validation", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from medmerge.threads import use_threads

    use_threads(args.threads)
    config = study_config(args)
    args.work.mkdir(parents=True, exist_ok=True)
    experts = train_experts(config, args.work)
    if args.stage == "train":
        print(json.dumps({k: str(v) for k, v in experts.items()}))
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
