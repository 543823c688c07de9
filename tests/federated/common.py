"""What the federation tests share: tiny sites whose every question and answer carries a canary, a
PubMedQA file (the publisher's format) likewise, and the study config over them."""

from __future__ import annotations

import json
from pathlib import Path

from medmerge.federated.config import FederatedConfig

TOPICS = {"north": ["hypertension", "angina", "stroke"], "south": ["eczema", "psoriasis", "acne"]}


def canary(site: str, i: int) -> str:
    return f"CANARY{site.upper()}{i:03d}ZQ"


def write_site(path: Path, site: str, n: int = 30) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[site][i % 3]
            row = {
                "question": f"What helps {topic}? {canary(site, i)}",
                "answer": f"For {topic} rest. {canary(site, i)}a",
            }
            f.write(json.dumps(row) + "\n")
    return path


def study(
    root: Path, base: Path, sites=tuple(TOPICS), trials: int = 2, isolate: bool = False, **federation
) -> FederatedConfig:
    """A tiny federated study; sites train in their worker unless `isolate` (the default of real configs)."""
    return FederatedConfig.model_validate(
        {
            "base_model": str(base),
            "sites": [
                {"name": s, "data": [f"jsonl:{write_site(root / f'{s}.jsonl', s.split('-')[0])}"]}
                for s in sites
            ],
            "fractions": [0.6, 0.2, 0.2],
            "threads": 1,
            "isolate_steps": isolate,
            "train": {
                "method": "lora",
                "max_steps": 3,
                "batch_size": 8,
                "learning_rate": 0.01,
                "eval_every": 0,
                "checkpoint_every": 0,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "autocast": "off",
            },
            "methods": ["task_arithmetic"],
            "search": {"trials": trials, "validation_examples": 4, "seed": 0},
            "evaluate": {"max_examples": 4},
            "federation": {"per_question": True, "reply_timeout_s": 300, **federation},
        }
    )


LABELS = ["yes", "no", "maybe", "yes", "no", "yes", "maybe", "no"]


def write_pubmedqa(path: Path) -> Path:
    """A PubMedQA PQA-L file (the publisher's format) whose every text carries a canary."""
    data = {
        str(2000 + i): {
            "QUESTION": f"Is asthma linked to case {i}? CANARYPUBMED{i:03d}ZQ",
            "CONTEXTS": [f"Background CANARYPUBMED{i:03d}ZQ.", "Results: the disease was common."],
            "LONG_ANSWER": f"Asthma is {label} linked. CANARYPUBMED{i:03d}ZQ",
            "final_decision": label,
            "YEAR": "2001",
        }
        for i, label in enumerate(LABELS)
    }
    path.write_text(json.dumps(data))
    return path


def with_evaluator(config: FederatedConfig, ood: Path, name: str = "clinic") -> FederatedConfig:
    """`config` plus an evaluate-only node holding the PubMedQA file `ood` as its out-of-domain set."""
    data = config.model_dump(mode="json")
    node = {"name": name, "role": "evaluate", "ood": [f"pubmedqa:{ood}"]}
    return FederatedConfig.model_validate(data | {"sites": [*data["sites"], node]})
