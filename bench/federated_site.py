"""One site's requests on the real model, timed: the adapter exchange, score requests and FedAvg rounds,
as the site's resident worker answers them (medmerge.federated.worker.answer, in this process).

    flock /tmp/medmerge-heavy.lock python bench/federated_site.py --datasets ../shared/datasets \
        --out /tmp/site-bench [--local-steps 20] [--profile /tmp/site.prof]

The site is `nih` of configs/federated-demo.yaml (MedQuAD; threads, search and training settings as
there); its peers' adapters are two random rank-16 LoRA adapters on smollm2-135m (what a score costs
does not depend on whether they were trained). Prints one line per request: kind, seconds, reply kind.
The requests carry a run id (sites before the typed protocol ignore it), so the same script times
any version whose site answers through `worker.answer`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

RUN = "0123456789abcdef0123456789abcdef"
SPECS = {"medquad": "MedQuAD-master.zip", "genmedgpt": "chatdoctor5k.json"}


def random_adapter(base: Path, seed: int, out: Path) -> dict[str, bytes]:
    """A rank-16 all-linear LoRA adapter with random A and B (scaled so the merge stays sane)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medmerge.models import load_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(base),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(out)
    return {f: (out / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--scores", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile of the requests (in process)")
    parser.add_argument("--base", default=None, help="another base model (a smoke run on a tiny one)")
    args = parser.parse_args()

    from medmerge.federated.fedavg import aggregate
    from medmerge.federated.wire import Payload
    from medmerge.federated.worker import answer
    from medmerge.models import resolve_model

    config = yaml.safe_load(Path("configs/federated-demo.yaml").read_text())
    for site in config["sites"]:
        site["data"] = [f"{s}:{args.datasets.resolve() / SPECS[s]}" for s in site["data"]]
    config["base_model"] = args.base or config["base_model"]
    if args.profile:
        config["isolate_steps"] = False  # the training in this process, so that cProfile sees it
    folder = args.out / "nih"
    folder.mkdir(parents=True, exist_ok=True)
    nih = {**config, "sites": [s if s["name"] == "nih" else {**s, "data": []} for s in config["sites"]]}
    (folder / "config.yaml").write_text(yaml.safe_dump(nih))

    base = resolve_model(config["base_model"])
    adapters = {
        n: random_adapter(base, i, args.out / f"adapter-{n}") for i, n in enumerate(("nih", "chatdoctor"))
    }
    blobs = {f"{n}/{f}": data for n, files in adapters.items() for f, data in files.items()}
    requests = [("adapters", {"order": list(adapters), "statistics": []}, blobs)]
    recipe = {"method": "task_arithmetic", "parameters": {"lambda": 1.0}, "weights": [1.0, 1.0], "seed": 0}
    recipe["experts"] = list(adapters)
    requests += [("score", {"recipe": recipe}, {})] * args.scores
    data, _ = aggregate(adapters, {n: 1.0 for n in adapters})
    for number in range(args.rounds):
        meta = {"round": number + 1, "local_steps": args.local_steps}
        requests.append(("fedavg", meta, {"aggregate.safetensors": data}))

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    for kind, meta, request_blobs in requests:
        request = Payload(kind, {"run": RUN, **meta}, request_blobs)
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        reply = answer(
            "nih", str(folder / "config.yaml"), str(folder), Payload.from_bytes(request.to_bytes())
        )
        if profiler:
            profiler.disable()
        took = time.perf_counter() - started
        print(json.dumps({"request": kind, "seconds": round(took, 2), "reply": reply.kind}), flush=True)
        if reply.kind == "error":
            print(reply.meta, flush=True)
    if profiler:
        profiler.dump_stats(str(args.profile))


if __name__ == "__main__":
    main()
