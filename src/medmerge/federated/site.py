"""What a site does. Its SPECs, questions, answers, token ids and expert training stay in `out`; it
answers each request with a Payload of adapters (safetensors bytes), checksums and numbers only.

    train     train (or reuse) the site's LoRA expert; reply adapter + manifest (pairs, data checksum,
              training settings, base identity, DP ε when trained with DP)
    adapters  store every site's adapter under out/peers/<site>/, re-pointed at the local base
    score     build the recipe's merge into a resident base model; reply validation Σ nll and tokens
    fedavg    FedAvg round: add the coordinator's aggregate to out/fedavg/global, then (local_steps > 0)
              train a fresh LoRA on it; reply that adapter and #pairs (federated/fedavg.py)
    evaluate  base, experts and merges on the site's validation and test splits; reply Σ nll, tokens
              (and per-question losses where the study allows)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.federated.config import FederatedConfig
from medmerge.federated.wire import Payload

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Site:
    name: str
    config: FederatedConfig  # the site's copy: its own SPECs only
    out: Path

    @property
    def specs(self) -> list[str]:
        return self.config.site(self.name).data

    def handle(self, request: Payload) -> Payload:
        from medmerge.threads import use_threads

        use_threads(self.config.threads)
        handlers = {"train": self.train, "adapters": self.adapters, "score": self.score}
        handlers |= {"evaluate": self.evaluate, "fedavg": self.fedavg}
        if request.kind not in handlers:
            raise MedmergeError(f"site {self.name}: unknown request {request.kind!r}")
        return handlers[request.kind](request)

    # ----------------------------------------------------------------------------------------- train
    def train(self, request: Payload) -> Payload:
        from medmerge.data import spec_checksum
        from medmerge.manifest import checksum
        from medmerge.models import resolve_model
        from medmerge.train import train_expert

        if not self.specs:
            raise MedmergeError(f"site {self.name}: no data SPECs in its config")
        train = self.config.train_config(self.specs)
        folder, key_file = self.out / "expert", self.out / "expert.key"
        key = hashlib.sha256(train.model_dump_json().encode()).hexdigest()
        if not (folder.is_dir() and key_file.is_file() and key_file.read_text() == key):
            train_expert(train, folder, overwrite=True, progress=False)
            key_file.write_text(key)
        pairs = self._pairs()
        data = hashlib.sha256("".join(str(spec_checksum(s)) for s in self.specs).encode()).hexdigest()
        manifest = (
            json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
        )
        privacy = manifest.get("privacy") or {}
        meta = {
            "site": self.name,
            "base": {
                "name": self.config.base_model,
                "checksum": checksum(resolve_model(self.config.base_model)),
            },
            "pairs": pairs,
            "data_checksum": data,
            "train": self.config.train.model_dump(mode="json"),
            "dp_epsilon": privacy.get("epsilon") if isinstance(privacy, dict) else None,
        }
        return Payload("train", meta, {f: (folder / f).read_bytes() for f in ADAPTER_FILES})

    def _pairs(self) -> int:
        from medmerge.data import load_split

        split = self.config.split_settings()
        return sum(
            len(load_split(s, "train", split.split_seed, split.fractions, self.config.train_examples))
            for s in self.specs
        )

    # ---------------------------------------------------------------------------------------- fedavg
    def fedavg(self, request: Payload) -> Payload:
        from medmerge.federated.fedavg import AGGREGATE, apply_aggregate
        from medmerge.models import resolve_model
        from medmerge.train import train_expert

        folder, round_ = self.out / "fedavg", int(request.meta["round"])
        state_file, current = folder / "applied.json", folder / "global"
        applied = json.loads(state_file.read_text())["round"] if state_file.is_file() else 0
        if AGGREGATE in request.blobs and applied < round_:  # idempotent when a request is repeated
            source = current if current.is_dir() else resolve_model(self.config.base_model)
            apply_aggregate(source, request.blobs[AGGREGATE], folder / "next")
            if current.is_dir():
                shutil.rmtree(current)
            (folder / "next").rename(current)
            state_file.write_text(json.dumps({"round": round_}))
        steps = int(request.meta.get("local_steps", 0))
        if not steps:
            return Payload("fedavg", {"site": self.name, "round": round_})
        model = current if current.is_dir() else resolve_model(self.config.base_model)
        train = self.config.train_config(self.specs).model_copy(
            update={
                "model": str(model),
                "max_steps": steps,
                "seed": self.config.train.seed + round_,
                "checkpoint_every": 0,
                "eval_every": 0,
                "warmup_steps": min(self.config.train.warmup_steps, steps - 1),
            }
        )
        train_expert(train, folder / "update", overwrite=True, progress=False)
        blobs = {f: (folder / "update" / f).read_bytes() for f in ADAPTER_FILES}
        return Payload("fedavg", {"site": self.name, "round": round_, "pairs": self._pairs()}, blobs)

    # -------------------------------------------------------------------------------------- adapters
    def adapters(self, request: Payload) -> Payload:
        order = request.meta["order"]
        for name in order:
            write_adapter(self.out / "peers" / name, request.blobs, name, self.config.base_model)
        (self.out / "peers" / "order.json").write_text(json.dumps(order))
        return Payload("adapters", {"site": self.name, "stored": order})

    def _peers(self) -> list[str]:
        order = json.loads((self.out / "peers" / "order.json").read_text())
        return [str(self.out / "peers" / name) for name in order]

    # ----------------------------------------------------------------------------------------- score
    def score(self, request: Payload) -> Payload:
        losses = self._losses({"trial": request.meta["recipe"]}, "validation", self.config.search)
        return Payload("score", {"site": self.name, **losses["trial"]})

    def evaluate(self, request: Payload) -> Payload:
        models = request.meta["models"]
        out = {
            split: self._losses(models, split, self.config.search if split == "validation" else None)
            for split in ("validation", "test")
        }
        if not self.config.federation.per_question:
            for split in out.values():
                for numbers in split.values():
                    numbers.pop("per_question", None)
        return Payload("evaluate", {"site": self.name, "results": out})

    def _losses(self, models: dict[str, Any], split: str, search: Any) -> dict[str, dict[str, Any]]:
        """{model: {nll_sum, tokens, per_question: [[nll, tokens], ...]}} on `split` of the site's SPECs;
        a model is "base", a peer's name, or a recipe (dict) merged into the resident base model."""
        from medmerge.data import load_split
        from medmerge.evaluate.scorer import encode_loss_batches, load_weights, per_question_loss
        from medmerge.merge import merged_state
        from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model

        settings = search or self.config.evaluate
        limit = self.config.search.validation_examples if search is not None else settings.max_examples
        split_settings = self.config.split_settings()
        pairs = [
            p
            for s in self.specs
            for p in load_split(s, split, split_settings.split_seed, split_settings.fractions, limit)
        ]
        base = resolve_model(self.config.base_model)
        batches, order = encode_loss_batches(
            pairs,
            load_tokenizer(base),
            model_kind(base),
            batch_size=settings.batch_size,
            max_prompt_tokens=settings.max_prompt_tokens,
            max_answer_tokens=settings.max_answer_tokens,
        )
        peers = {Path(p).name: p for p in self._peers()} if (self.out / "peers").is_dir() else {}
        resident, results = load_model(base), {}
        for name, model in models.items():
            if isinstance(model, dict):
                load_weights(
                    resident, merged_state(recipe_config(model, self.config.base_model, self._peers()))
                )
                scored = resident
            elif model == "base":
                scored = load_model(base)
            elif model == "fedavg":
                scored = load_model(self.out / "fedavg" / "global")
            else:
                scored = load_model(peers[model])
            nll, tokens = per_question_loss(scored, batches, order)
            results[name] = {
                "nll_sum": sum(nll),
                "tokens": sum(tokens),
                "per_question": [[a, b] for a, b in zip(nll, tokens, strict=True)],
            }
        return results


def write_adapter(folder: Path, blobs: dict[str, bytes], name: str, base_model: str) -> Path:
    """Write `name`'s adapter from `blobs` ("<name>/<file>") into `folder`, re-pointed at `base_model`."""
    from medmerge.manifest import atomic_dir

    with atomic_dir(folder, overwrite=True) as tmp:
        config = json.loads(blobs[f"{name}/adapter_config.json"])
        base = Path(base_model).expanduser()
        config["base_model_name_or_path"] = str(base.resolve()) if base.is_dir() else base_model
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / "adapter_model.safetensors").write_bytes(blobs[f"{name}/adapter_model.safetensors"])
    return folder


def recipe_config(recipe: dict[str, Any], base_model: str, experts: list[str]) -> Any:
    """The MergeConfig of a recipe {method, parameters, weights, seed} over local expert folders."""
    from medmerge.pipeline.records import SearchTrial
    from medmerge.pipeline.search import merge_config

    setting = SearchTrial(0, dict(recipe["parameters"]), list(recipe["weights"]), 0.0, {})
    return merge_config(recipe["method"], base_model, experts, setting, int(recipe["seed"]))
