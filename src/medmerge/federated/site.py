"""What a site does. Its SPECs, questions, answers, token ids and expert training stay in `out`; it
answers each request with a Payload of adapters (safetensors bytes), checksums and numbers only.

    hello     name and role (the coordinator learns which node is which site)
    train     train (or reuse) the site's LoRA expert; reply adapter + manifest (pairs, data checksum,
              training settings, base identity, DP ε when trained with DP); when the request names
              statistics kinds (and the site's own config has federation.share_statistics), also its site
              statistics of those kinds (medmerge.train.statistics), computed on its training questions:
              statistics.safetensors and statistics.json without its data record (shared_record)
    adapters  store every site's adapter under out/peers/<site>/, re-pointed at the local base (and the
              site's own shared statistics beside its own adapter)
    statistics  store one peer's shared statistics beside its adapter (out/peers/<peer>/)
    score     build the recipe's merge (over the recipe's `experts`, default every peer) into a resident
              base model; reply validation Σ nll and tokens
    fedavg    FedAvg round: add the coordinator's aggregate to out/fedavg/global, then (local_steps > 0,
              expert sites) train a fresh LoRA on it; reply that adapter and #pairs (federated/fedavg.py)
    evaluate  every model on the site's validation split (Σ nll, tokens) and on each of its sets, in
              domain (its test split) and out of domain (`ood`), with the metrics of `medmerge evaluate`
              (medmerge.evaluate.runner: loss, PubMedQA accuracy, ROUGE/BLEU/chrF/BERTScore when
              generating); reply per set and model Σ w·v and Σ w of every metric, the site's bootstrap
              intervals, per-question values only where the study allows, and the SHA-256 of each merge's
              weights as scored. Never the answers, question ids or set SPECs.

An evaluate-only node (role `evaluate`) has no training data: it stores the adapters, applies FedAvg's
aggregates without training, and evaluates on its `ood` sets.
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
from medmerge.manifest import write_json_atomic

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# medmerge.site_stats's TENSORS_FILE and INFO_FILE, in the order they are written (the record last)
STATISTICS_FILES = ("statistics.safetensors", "statistics.json")
# what of statistics.json is shared: the counts and the record of the tensor file, never `data` (the
# site's SPECs: local paths) or `model` (its folder)
SHARED_RECORD = ("format", "kinds", "dtype", "bytes", "sha256", "aliases", "examples", "tokens", "per_kind")


@dataclass(frozen=True)
class Site:
    name: str
    config: FederatedConfig  # the site's copy: its own SPECs only
    out: Path

    @property
    def specs(self) -> list[str]:
        return self.config.site(self.name).data

    @property
    def role(self) -> str:
        return self.config.site(self.name).role

    def _step(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A heavy step (a training, the statistics) in a child process when the config isolates steps,
        so the resident worker gives its memory back after each (medmerge.isolation)."""
        if self.config.isolate_steps:
            from medmerge.isolation import run_in_child

            return run_in_child(f"site {self.name}: {what}", fn, *args, threads=self.config.threads, **kwargs)
        return fn(*args, **kwargs)

    def hello(self, request: Payload) -> Payload:
        return Payload("hello", {"site": self.name, "role": self.role})

    def handle(self, request: Payload) -> Payload:
        from medmerge.threads import use_threads

        use_threads(self.config.threads)
        handlers = {"train": self.train, "adapters": self.adapters, "score": self.score}
        handlers |= {"statistics": self.statistics}
        handlers |= {"evaluate": self.evaluate, "fedavg": self.fedavg, "hello": self.hello}
        if request.kind not in handlers:
            raise MedmergeError(f"site {self.name}: unknown request {request.kind!r}")
        return handlers[request.kind](request)

    # ----------------------------------------------------------------------------------------- train
    def train(self, request: Payload) -> Payload:
        from medmerge.data import spec_checksum
        from medmerge.manifest import checksum
        from medmerge.models import resolve_model
        from medmerge.train import train_expert

        if not self.specs or self.role != "expert":
            raise MedmergeError(f"site {self.name}: no data SPECs in its config (or an evaluate-only node)")
        kinds = sorted(request.meta.get("statistics") or [])
        if kinds and not self.config.federation.share_statistics:  # its own choice, before training
            raise MedmergeError(
                f"site {self.name}: asked for site statistics ({', '.join(kinds)}), but its config has "
                "federation.share_statistics: false"
            )
        train = self.config.train_config(self.specs)
        folder, key_file = self.out / "expert", self.out / "expert.key"
        key = hashlib.sha256(train.model_dump_json().encode()).hexdigest()
        if not (folder.is_dir() and key_file.is_file() and key_file.read_text() == key):
            (self.out / "statistics.key").unlink(missing_ok=True)
            self._step("training", train_expert, train, folder, overwrite=True, progress=False)
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
        blobs = {f: (folder / f).read_bytes() for f in ADAPTER_FILES}
        return Payload("train", meta, blobs | (self._statistics(kinds, key) if kinds else {}))

    def _statistics(self, kinds: list[str], expert_key: str) -> dict[str, bytes]:
        """The expert's site statistics of `kinds`, computed once per expert and settings, as shared."""
        from medmerge.site_stats import has_statistics
        from medmerge.train.statistics import compute_statistics

        settings, folder = self.config.federation.statistics, self.out / "expert"
        key_file = self.out / "statistics.key"
        key = hashlib.sha256(
            json.dumps({"expert": expert_key, "kinds": kinds, "settings": settings.model_dump()}).encode()
        ).hexdigest()
        if not (has_statistics(folder) and key_file.is_file() and key_file.read_text() == key):
            key_file.unlink(missing_ok=True)
            self._step(
                "statistics",
                compute_statistics,
                folder,
                self.specs,
                kinds=kinds,
                overwrite=True,
                progress=False,
                **settings.arguments(),
            )
            key_file.write_text(key)
        return self._shared_statistics()

    def _shared_statistics(self) -> dict[str, bytes]:
        """What of the expert's statistics crosses the wire: the tensor file, and its record without the
        data sources and model paths (SHARED_RECORD)."""
        tensors, info = (self.out / "expert" / f for f in STATISTICS_FILES)
        record = {k: v for k, v in json.loads(info.read_text()).items() if k in SHARED_RECORD}
        return {tensors.name: tensors.read_bytes(), info.name: json.dumps(record, indent=2).encode()}

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
            write_json_atomic(state_file, {"round": round_})
        steps = int(request.meta.get("local_steps", 0)) if self.role == "expert" else 0
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
        self._step(
            f"FedAvg round {round_}", train_expert, train, folder / "update", overwrite=True, progress=False
        )
        blobs = {f: (folder / "update" / f).read_bytes() for f in ADAPTER_FILES}
        return Payload("fedavg", {"site": self.name, "round": round_, "pairs": self._pairs()}, blobs)

    # -------------------------------------------------------------------------------------- adapters
    def adapters(self, request: Payload) -> Payload:
        order = request.meta["order"]
        for name in order:
            write_adapter(self.out / "peers" / name, request.blobs, name, self.config.base_model)
        if self.name in request.meta.get("statistics", []):  # its own, as it shared them
            files = {f"{self.name}/{f}": data for f, data in self._shared_statistics().items()}
            store_statistics(self.out / "peers" / self.name, files, self.name)
        write_json_atomic(self.out / "peers" / "order.json", order)
        return Payload("adapters", {"site": self.name, "stored": order})

    def statistics(self, request: Payload) -> Payload:
        """Store a peer's shared statistics beside its stored adapter."""
        peer = str(request.meta["peer"])
        (folder,) = self._peers([peer])
        store_statistics(Path(folder), request.blobs, peer)
        return Payload("statistics", {"site": self.name, "stored": peer})

    def _peers(self, names: list[str] | None = None) -> list[str]:
        """Folders of the stored peers' adapters: `names` (a recipe's experts) or every peer, in order."""
        order = json.loads((self.out / "peers" / "order.json").read_text())
        unknown = sorted(set(names or []) - set(order))
        if unknown:
            raise MedmergeError(f"site {self.name}: no adapter stored for {unknown}")
        return [str(self.out / "peers" / name) for name in (order if names is None else names)]

    def _load(self, model: str | dict[str, Any], resident: Any, dtype: str = "float32") -> tuple[Any, Any]:
        """(the model, SHA-256 of its merged weights or None): "base", a peer, "fedavg", or a recipe
        (dict) merged in memory into `resident` (the resident base model)."""
        from medmerge.evaluate.scorer import load_weights
        from medmerge.merge import merged_state
        from medmerge.models import load_model, resolve_model

        if isinstance(model, dict):
            experts = self._peers(model.get("experts"))
            state = merged_state(recipe_config(model, self.config.base_model, experts))
            load_weights(resident, state)
            return resident, state_digest(state)
        if model == "base":
            return load_model(resolve_model(self.config.base_model), dtype=dtype), None
        folder = self.out / "fedavg" / "global" if model == "fedavg" else self.out / "peers" / model
        return load_model(folder, dtype=dtype), None

    # ----------------------------------------------------------------------------------------- score
    def score(self, request: Payload) -> Payload:
        return Payload(
            "score", {"site": self.name, **self._validation({"trial": request.meta["recipe"]})["trial"]}
        )

    def _validation(self, models: dict[str, Any]) -> dict[str, dict[str, float]]:
        """{model: {nll_sum, tokens}} on the site's validation split (the search's settings)."""
        from medmerge.data import load_split
        from medmerge.evaluate.scorer import encode_loss_batches, per_question_loss
        from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model

        search, split = self.config.search, self.config.split_settings()
        pairs = [
            p
            for s in self.specs
            for p in load_split(
                s, "validation", split.split_seed, split.fractions, search.validation_examples
            )
        ]
        base = resolve_model(self.config.base_model)
        batches, order = encode_loss_batches(
            pairs,
            load_tokenizer(base),
            model_kind(base),
            batch_size=search.batch_size,
            max_prompt_tokens=search.max_prompt_tokens,
            max_answer_tokens=search.max_answer_tokens,
        )
        resident, results = load_model(base), {}
        for name, model in models.items():
            nll, tokens = per_question_loss(self._load(model, resident)[0], batches, order)
            results[name] = {"nll_sum": sum(nll), "tokens": sum(tokens)}
        return results

    # -------------------------------------------------------------------------------------- evaluate
    def evaluate(self, request: Payload) -> Payload:
        """Request meta: models {name: "base" | peer | "fedavg" | recipe}, and optionally validation
        (default true) and domains (default both) to limit what is scored."""
        from medmerge.evaluate.cache import EvalCache
        from medmerge.evaluate.records import ModelRef
        from medmerge.evaluate.runner import _evaluate_cell, _ModelRun, load_pairs
        from medmerge.models import load_model, load_tokenizer, model_kind, resolve_model

        models = request.meta["models"]
        validation = self._validation(models) if request.meta.get("validation", True) and self.specs else {}
        config, sets = self._sets(request.meta.get("domains", ["in-domain", "out-of-domain"]))
        pairs = {label: load_pairs(s, config) for label, s in sets}
        cells: dict[str, dict[str, Any]] = {label: {} for label, _ in sets}
        digests: dict[str, str] = {}
        base = resolve_model(self.config.base_model)
        tokenizer, kind = load_tokenizer(base), model_kind(base)
        resident = load_model(base, dtype=config.dtype) if sets else None
        for name, model in models.items() if sets else ():
            scored, digest = self._load(model, resident, config.dtype)
            digests |= {name: digest} if digest else {}
            run = _ModelRun(ModelRef(name, "", "", kind), tokenizer, config, EvalCache(None), False, scored)
            for label, s in sets:
                cells[label][name] = _wire(
                    _evaluate_cell(run, s, pairs[label]), self.config.federation.per_question
                )
        meta = {
            "site": self.name,
            "validation": validation,
            "sets": [{"name": label, "domain": s.domain, "n": len(pairs[label])} for label, s in sets],
            "cells": cells,
            "merges": digests,
        }
        return Payload("evaluate", meta)

    def _sets(self, domains: list[str]) -> tuple[Any, list[tuple[str, Any]]]:
        """The site's EvaluateConfig and its sets in `domains`, each labelled by its dataset kind alone
        (`medquad`, `pubmedqa`, `jsonl`, with -2, -3 … where repeated): no path or SPEC leaves the site."""
        from medmerge.data import parse_spec
        from medmerge.evaluate.runner import eval_sets

        config = self.config.evaluate_config(self.name)
        if not config.data and not config.ood:
            return config, []
        labelled: list[tuple[str, Any]] = []
        for s in eval_sets(config):
            kind = parse_spec(s.spec).kind
            taken = {label for label, _ in labelled}
            label = next(n for n in [kind] + [f"{kind}-{k}" for k in range(2, 100)] if n not in taken)
            labelled.append((label, s))
        return config, [(label, s) for label, s in labelled if s.domain in domains]


def _wire(cell: Any, per_question: bool) -> dict[str, Any]:
    """What of an EvalCell crosses the wire: per metric Σ w·v and Σ w (w: answer tokens for the loss,
    1 otherwise), the site's bootstrap intervals and corpus scores; per-question values and weights only
    with `per_question`. Never the answers or question ids."""
    sums = {}
    for metric, values in cell.per_item.items():
        weights = cell.weights.get(metric) or [1.0] * len(values)
        sums[metric] = [sum(v * w for v, w in zip(values, weights, strict=True)), float(sum(weights))]
    out = {"metrics": {k: v.as_dict() for k, v in cell.metrics.items()}, "sums": sums, "corpus": cell.corpus}
    return out | ({"per_item": cell.per_item, "weights": cell.weights} if per_question else {})


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a state dict's tensors (sorted by name; name, shape and float32 bytes of each)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


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


def store_statistics(folder: Path, blobs: dict[str, bytes], name: str) -> Path:
    """Write `name`'s shared statistics from `blobs` ("<name>/<file>") into `folder`, beside its adapter:
    an old record removed, the tensor file, then its record (statistics.json, the commit record, last:
    as medmerge.site_stats writes them, so a half-written pair is never read)."""
    (folder / STATISTICS_FILES[1]).unlink(missing_ok=True)
    for file in STATISTICS_FILES:
        tmp = folder / f".{file}.tmp"
        tmp.write_bytes(blobs[f"{name}/{file}"])
        tmp.replace(folder / file)
    return folder


def recipe_config(recipe: dict[str, Any], base_model: str, experts: list[str]) -> Any:
    """The MergeConfig of a recipe {method, parameters, weights, seed} over local expert folders."""
    from medmerge.pipeline.records import SearchTrial
    from medmerge.pipeline.search import merge_config

    setting = SearchTrial(0, dict(recipe["parameters"]), list(recipe["weights"]), 0.0, {})
    return merge_config(recipe["method"], base_model, experts, setting, int(recipe["seed"]))
