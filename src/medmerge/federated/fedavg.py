"""Multi-round FedAvg of LoRA — the baseline beside one-shot merging — with exact aggregation.

FlowerTune / OpenFedLLM average A and B separately, which is not the average of the updates:
(Σ w_i B_i)(Σ w_i A_i) ≠ Σ w_i B_i A_i. Here each round every site trains a fresh rank-r LoRA for
`local_steps` on the current global model; the coordinator averages the updates themselves,
ΔW = Σ_i w_i s_i B_i A_i / Σ_i w_i (w_i = the site's training pairs), and re-factors ΔW by SVD at rank
Σ_i r_i, where the truncation drops nothing (rank ΔW ≤ Σ r_i): the aggregate is exact to float
rounding. Every party adds ΔW to its copy of the global weights, and the next round trains a new LoRA
on top (as FLoRA, Wang et al. 2024, stacking; not FFA-LoRA, which needs A frozen in the training loop).
On the wire per round: down, the aggregate (Σ r_i factors per module, i.e. K adapters' worth); up, one
rank-r adapter per site.

    aggregate.safetensors   {"<weight>.A": (k, in), "<weight>.B": (out, k)}: ΔW = B·A in the weight's
                            own orientation, scale 1
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

AGGREGATE = "aggregate.safetensors"


def adapter_deltas(blobs: dict[str, bytes]) -> dict[str, tuple[torch.Tensor, int]]:
    """{base weight name: (ΔW = s·B·A float32 in the weight's orientation, rank r)} of one PEFT LoRA
    adapter given as blobs {"adapter_config.json", "adapter_model.safetensors"}."""
    from medmerge.merge.lora import delta_weight, read_adapter

    with tempfile.TemporaryDirectory(prefix="medmerge-fedavg-") as tmp:
        for name, data in blobs.items():
            (Path(tmp) / name).write_bytes(data)
        modules, _, _ = read_adapter(Path(tmp))
        return {name: (delta_weight(m), m.a.shape[0]) for name, m in modules.items()}


def aggregate(updates: dict[str, dict[str, bytes]], weights: dict[str, float]) -> tuple[bytes, dict]:
    """The exact weighted average of the sites' updates, factored: (aggregate.safetensors bytes, info with
    its rank per module and the largest SVD relative error, ~1e-7 for float rounding only)."""
    from safetensors.torch import save

    from medmerge.merge.lora import factor

    total = float(sum(weights[s] for s in updates))
    deltas = {site: adapter_deltas(blobs) for site, blobs in updates.items()}
    modules = sorted({m for d in deltas.values() for m in d})
    tensors, error, ranks = {}, 0.0, {}
    for module in modules:
        present = [s for s in updates if module in deltas[s]]
        mean = sum(deltas[s][module][0] * (weights[s] / total) for s in present)
        f = factor(mean, sum(deltas[s][module][1] for s in present))  # rank ΔW ≤ Σ r_i: nothing dropped
        tensors[f"{module}.A"], tensors[f"{module}.B"] = f.a, f.b
        error, ranks[module] = max(error, f.relative_error), f.rank
    info = {"modules": len(modules), "max_rank": max(ranks.values(), default=0), "max_svd_error": error}
    return save(tensors), info


def read_aggregate(data: bytes) -> dict[str, torch.Tensor]:
    """{weight name: ΔW} of an aggregate."""
    from safetensors.torch import load

    tensors = load(data)
    return {k[:-2]: tensors[f"{k[:-2]}.B"] @ tensors[k] for k in tensors if k.endswith(".A")}


def apply_aggregate(model: Path, data: bytes, out: Path) -> Path:
    """Write `out`: the model folder `model` with ΔW added to its weights (atomic); other files copied."""
    from safetensors.torch import load_file, save_file

    from medmerge.errors import MedmergeError
    from medmerge.manifest import atomic_dir

    deltas = read_aggregate(data)
    with atomic_dir(out, overwrite=True) as tmp:
        for file in sorted(model.iterdir()):
            if file.suffix != ".safetensors":
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)
                continue
            state = load_file(str(file))
            for name in [n for n in state if n in deltas]:
                weight = state[name]
                state[name] = (weight.to(torch.float32) + deltas.pop(name)).to(weight.dtype)
            save_file(state, str(tmp / file.name), metadata={"format": "pt"})
        if deltas:
            raise MedmergeError(
                f"{model}: no weight for {len(deltas)} aggregate module(s), e.g. {next(iter(deltas))}"
            )
        (tmp / "fedavg.json").write_text(json.dumps({"from": str(model)}))
    return out
