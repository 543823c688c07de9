"""A composed privacy ledger from a federated run with DP and FedAvg (docs/privacy.md, issue 22).

The whole study (`run_study`: train, adapter exchange, search, FedAvg, evaluation, verdict) in one
process, every request and reply crossing as wire bytes (the in-process exchange of the federation
tests): two expert sites, each one MedQuAD collection (the `group` unit: one focus topic with all its
questions), a tiny random Llama (hidden 32, 2 layers; tests/tiny.py) as the base so that it runs in
minutes on 2 cores — the accounting is the same for any model. Every site trains its expert by DP-SGD
at target ε (--epsilon) and each FedAvg round by DP-SGD at the same target, all charged to the site's
`privacy_ledger.json`; the verdict's "Privacy per site" section and one site's ledger are printed.

    flock /tmp/medmerge-heavy.lock .venv/bin/python bench/federated_ledger.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDQUAD = ROOT / ".." / "shared" / "datasets" / "MedQuAD-master.zip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None)
    parser.add_argument("--data", default=str(MEDQUAD))
    parser.add_argument("--sites", default="1_CancerGov_QA,3_GHR_QA", help="one MedQuAD collection per site")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target ε of each release")
    parser.add_argument("--budget", type=float, default=4.0, help="privacy.budget of each site")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=200)
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="federated_ledger-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from tests.federated.test_inprocess import LocalSend
    from tests.tiny import build_tiny_llama

    from medmerge.federated.config import FederatedConfig
    from medmerge.federated.coordinator import Exchange, run_study
    from medmerge.train.ledger import PrivacyLedger

    base = build_tiny_llama(work / "tiny-llama")
    data = Path(args.data).resolve()
    collections = args.sites.split(",")
    names = [f"site{k + 1}" for k in range(len(collections))]
    config = FederatedConfig.model_validate(
        {
            "base_model": str(base),
            "sites": [
                {"name": n, "data": [f"medquad:{data}?collections={c}"]}
                for n, c in zip(names, collections, strict=True)
            ],
            "train_examples": args.train_examples,
            "threads": 2,
            "isolate_steps": False,
            "train": {
                "method": "lora",
                "max_steps": 20,
                "batch_size": 16,
                "learning_rate": 0.01,
                "eval_every": 0,
                "checkpoint_every": 0,
                "group_by_length": False,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "autocast": "off",
                "privacy": {"target_epsilon": args.epsilon, "max_grad_norm": 1.0, "budget": args.budget},
            },
            "methods": ["task_arithmetic"],
            "search": {"trials": 2, "validation_examples": 8, "seed": 0},
            "evaluate": {"max_examples": 8},
            "federation": {"fedavg": {"rounds": args.rounds, "local_steps": args.local_steps}},
        }
    )
    send, out = LocalSend(config, work / "sites"), work / "coordinator"
    verdict = json.loads(run_study(config.for_party(None), out, Exchange(send, names, 2)).read_text())
    report = (out / "report.md").read_text()
    start = report.index("Privacy per site")
    print(report[start : report.index("\n\nBytes sent", start)].rstrip())
    print()
    print(f"{names[0]}/privacy_ledger.json, ledger.lines():")
    for line in PrivacyLedger.load(work / "sites" / names[0]).lines():
        print(line)
    print(f"\nverdict: {out / 'verdict.json'}; privacy: {json.dumps(verdict['verdict']['privacy'])[:200]}…")


if __name__ == "__main__":
    main()
