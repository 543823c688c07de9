"""What a site is and does. Its SPECs, questions, answers, token ids and expert training stay in `out`;
the protocol (medmerge.federated.protocol) calls these methods to answer each request, and only the
numbers, checksums and adapters they return cross the wire.

    out/expert/               its LoRA expert (and its statistics, when it shares them)
    out/peers/<peer>/         every expert's adapter as exchanged in the current run (order.json: the
                              run, the order, the adapters' digests), re-pointed at the local base
    out/fedavg/               FedAvg: applied.json (run, round), global/ (this run's global model),
                              update/ (the last round's local LoRA)
    out/budget.json           the queries it answered so far (score, evaluate), against its budget
    out/privacy_ledger.json   DP: every release it made, composed (federated.site_privacy)

A `Site` defends its own disk and data against a dishonest coordinator:
- every name a request carries (peers, recipe experts, evaluated models) must be a name
  (wire.NAME_PATTERN: no dot, no slash), and the folders it writes resolve inside `out`; blobs are
  written under fixed file names only;
- score and evaluate requests reference only adapters exchanged in the same run (stored peers, `base`,
  `fedavg` of this run, recipes over stored peers); a second exchange that would replace a stored
  adapter with another in the same run is refused;
- a query budget of its own (`federation.budget` in its config copy; counts kept in budget.json across
  runs and restarts): a request beyond it is refused (code over_budget), the reason logged here;
- per-question values leave only where its own config allows (`federation.per_question`), and only
  for the loss; an adapter's config leaves with base_model_name_or_path set to the study's base id and
  every key outside ADAPTER_CONFIG_KEYS dropped.

A worker keeps one `Site` across requests: the resident base model, the tokenizer and the encoded
validation batches are loaded once (`_resident`, `_validation_batches`).
An evaluate-only node (role `evaluate`) has no training data: it stores the adapters, applies FedAvg's
aggregates without training, and evaluates on its `ood` sets.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.federated.config import FederatedConfig
from medmerge.federated.site_privacy import budget_refusal, ledger_args
from medmerge.federated.site_privacy import summary as privacy_summary
from medmerge.federated.wire import OverBudget, Refused, check_name, loads, shown
from medmerge.manifest import write_json_atomic
from medmerge.steps import cached, step_key

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# medmerge.site_stats's TENSORS_FILE and INFO_FILE, in the order they are written (the record last)
STATISTICS_FILES = ("statistics.safetensors", "statistics.json")
# what of statistics.json is shared: the counts and the record of the tensor file, never `data` (the
# site's SPECs: local paths) or `model` (its folder)
SHARED_RECORD = ("format", "kinds", "dtype", "bytes", "sha256", "aliases", "examples", "tokens", "per_kind")
# the keys of a PEFT LoRA adapter_config.json that may cross the wire (their values are checked by the
# coordinator's adapter checks); base_model_name_or_path is rewritten to the study's base id
ADAPTER_CONFIG_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
        "bias",
        "init_lora_weights",
        "inference_mode",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "exclude_modules",
        "lora_bias",
        "base_model_name_or_path",
    }
)
BUDGET_FILE = "budget.json"
EXPERT_STEP = "expert-step.json"  # the expert's step record (medmerge.steps.cached) beside expert/
STATISTICS_STEP = "statistics-step.json"  # the same for its site statistics
# where a recipe's merged state may come from before the site merges it itself: fn(site, run, recipe) ->
# state or None (medmerge.federated.secure_site adds the merges built from secure sums)
RECIPE_SOURCES: list[Callable[[Site, str, Any], dict[str, Any] | None]] = []


def validation_batches(
    config: FederatedConfig, specs: list[str], tokenizer: Any, kind: str
) -> tuple[list[Any], list[int]]:
    """What a site scores recipes on: the first `search.validation_examples` validation pairs of each of
    its SPECs (the study's split), encoded as loss batches (medmerge.evaluate.scorer)."""
    from medmerge.data import load_split
    from medmerge.evaluate.scorer import encode_loss_batches

    search, split = config.search, config.split_settings()
    pairs = [
        p
        for s in specs
        for p in load_split(s, "validation", split.split_seed, split.fractions, search.validation_examples)
    ]
    return encode_loss_batches(
        pairs,
        tokenizer,
        kind,
        batch_size=search.batch_size,
        max_prompt_tokens=search.max_prompt_tokens,
        max_answer_tokens=search.max_answer_tokens,
    )


class Site:
    """One site's state: its name, its own config copy, its folder, the resident model (see module doc)."""

    def __init__(self, name: str, config: FederatedConfig, out: Path) -> None:
        self.name = check_name(name, "site name")
        self.config = config
        self.out = Path(out).resolve()
        self._cache: dict[str, Any] = {}

    @property
    def specs(self) -> list[str]:
        return self.config.site(self.name).data

    @property
    def role(self) -> str:
        return self.config.site(self.name).role

    def use_threads(self) -> None:
        """Torch's CPU threads as the site's config sets them (before each request: several sites may
        share one process in tests)."""
        from medmerge.threads import use_threads

        use_threads(self.config.threads)

    def _step(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A heavy step (a training, the statistics) in a child process when the config isolates steps,
        so the resident worker gives its memory back after each (medmerge.isolation). In local mode
        it first takes a memory slot (federated.slots), so only as many sites train at once as fit."""
        from medmerge.federated.slots import training_slot

        with training_slot(what):
            if self.config.isolate_steps:
                from medmerge.isolation import run_in_child

                label = f"site {self.name}: {what}"
                return run_in_child(label, fn, *args, threads=self.config.threads, **kwargs)
            return fn(*args, **kwargs)

    # ------------------------------------------------------------------------------ disk, budget
    def inside(self, *parts: str) -> Path:
        """out/<parts…>, refused unless it resolves inside the site's folder."""
        path = self.out.joinpath(*parts).resolve()
        if path == self.out or self.out not in path.parents:
            raise Refused(f"site {self.name}: {shown('/'.join(parts))} is outside its folder")
        return path

    def peer_folder(self, peer: str) -> Path:
        return self.inside("peers", check_name(peer, "peer"))

    def budget(self) -> dict[str, int]:
        """{kind: queries allowed over the folder's lifetime} from the site's own config."""
        return self.config.query_budget()

    def spend(self, kind: str, n: int) -> None:
        """Count `n` queries of `kind` against the budget (persisted first), or OverBudget."""
        path = self.out / BUDGET_FILE
        used = json.loads(path.read_text()) if path.is_file() else {}
        limit, spent = self.budget()[kind], int(used.get(kind, 0))
        if spent + n > limit:
            raise OverBudget(
                f"site {self.name}: {kind} budget spent ({spent} of {limit} used, {n} more asked; "
                f"federation.budget.{kind} in its config, counts in {path})"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**used, kind: spent + n})

    # ------------------------------------------------------------------------------------- train
    def train(self, kinds: list[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Train (or reuse) the expert: (TrainReply fields, blobs)."""
        from medmerge.data import spec_checksum
        from medmerge.manifest import checksum
        from medmerge.models import resolve_model
        from medmerge.train import train_expert

        if not self.specs or self.role != "expert":
            raise Refused(f"site {self.name}: no data SPECs in its config (or an evaluate-only node)")
        kinds = sorted(kinds)
        if kinds and not self.config.federation.share_statistics:  # its own choice, before training
            raise Refused(
                f"site {self.name}: asked for site statistics ({', '.join(kinds)}), but its config has "
                "federation.share_statistics: false"
            )
        train = self.config.train_config(self.specs)
        folder, key = self.out / "expert", step_key(train=train)

        def run_training() -> dict[str, Any]:
            with budget_refusal(self):
                ledger = ledger_args(self, "expert")
                self._step("training", train_expert, train, folder, overwrite=True, progress=False, **ledger)
            return {}

        if not folder.is_dir():  # a record without its folder is not a trained expert
            (self.out / EXPERT_STEP).unlink(missing_ok=True)
        cached(self.out, key, "training", run_training, record=EXPERT_STEP)
        data = hashlib.sha256("".join(str(spec_checksum(s)) for s in self.specs).encode()).hexdigest()
        manifest, base = folder / "manifest.json", self.config.base_model
        privacy = (json.loads(manifest.read_text()) if manifest.is_file() else {}).get("privacy") or {}
        meta = {
            "base": {"name": base, "checksum": checksum(resolve_model(base))},
            "pairs": self._pairs(),
            "data_checksum": data,
            "train": self.config.train.model_dump(mode="json"),
            "dp_epsilon": privacy.get("epsilon") if isinstance(privacy, dict) else None,
        }
        blobs = self._outgoing_adapter(folder)
        expert_id = checksum(folder / ADAPTER_FILES[1])  # the weights, whichever run made them
        return meta, blobs | (self._statistics(kinds, expert_id) if kinds else {})

    def _outgoing_adapter(self, folder: Path) -> dict[str, bytes]:
        """The adapter in `folder` as it leaves the site: its config cleaned (clean_adapter_config)."""
        config = (folder / ADAPTER_FILES[0]).read_bytes()
        return {
            ADAPTER_FILES[0]: clean_adapter_config(config, self.config.base_model, strict=False),
            ADAPTER_FILES[1]: (folder / ADAPTER_FILES[1]).read_bytes(),
        }

    def _statistics(self, kinds: list[str], expert_id: str) -> dict[str, bytes]:
        """The expert's site statistics of `kinds`, computed once per expert (`expert_id`: its adapter
        weights' SHA-256, so a retrained expert gets new statistics) and settings, as shared."""
        from medmerge.site_stats import has_statistics
        from medmerge.train.statistics import compute_statistics

        settings, folder = self.config.federation.statistics, self.out / "expert"
        key = step_key(expert=expert_id, kinds=kinds, settings=settings)

        def run_statistics() -> dict[str, Any]:
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
            return {}

        if not has_statistics(folder):
            (self.out / STATISTICS_STEP).unlink(missing_ok=True)
        cached(self.out, key, "statistics", run_statistics, record=STATISTICS_STEP)
        return self._shared_statistics()

    def _shared_statistics(self) -> dict[str, bytes]:
        """What of the expert's statistics crosses the wire: the tensor file, and its record without the
        data sources and model paths (SHARED_RECORD)."""
        tensors, info = (self.out / "expert" / f for f in STATISTICS_FILES)
        record = {k: v for k, v in json.loads(info.read_text()).items() if k in SHARED_RECORD}
        return {tensors.name: tensors.read_bytes(), info.name: json.dumps(record, indent=2).encode()}

    def _pairs(self) -> int:
        from medmerge.data import load_split

        if "pairs" not in self._cache:
            split = self.config.split_settings()
            self._cache["pairs"] = sum(
                len(load_split(s, "train", split.split_seed, split.fractions, self.config.train_examples))
                for s in self.specs
            )
        return self._cache["pairs"]

    # ---------------------------------------------------------------------------------- adapters
    def store_adapters(self, run: str, files: dict[str, dict[str, bytes]], statistics: list[str]) -> None:
        """Store each peer's adapter (fixed file names) under peers/<peer>/, and this site's own shared
        statistics beside its own adapter when it is in `statistics`. Refused when a peer's adapter was
        stored before in the same run and differs."""
        folders = {peer: self.peer_folder(peer) for peer in files}
        digests = {peer: adapter_digest(f) for peer, f in files.items()}
        state = self._peers_state()
        if state.get("run") == run:
            changed = sorted(p for p, d in digests.items() if state["digests"].get(p, d) != d)
            if changed:
                raise Refused(
                    f"site {self.name}: a second adapter exchange in run {run} would replace the adapters "
                    f"of {changed}"
                )
        for peer, folder in folders.items():
            write_adapter(folder, files[peer], self.config.base_model)
        if self.name in statistics and self.name in folders:  # its own, as it shared them
            store_statistics(folders[self.name], self._shared_statistics())
        order = list(files)
        write_json_atomic(self.out / "peers" / "order.json", {"run": run, "order": order, "digests": digests})

    def _peers_state(self) -> dict[str, Any]:
        path = self.out / "peers" / "order.json"
        state = json.loads(path.read_text()) if path.is_file() else {}
        return state if isinstance(state, dict) and "run" in state else {}

    def store_statistics(self, run: str, peer: str, blobs: dict[str, bytes]) -> None:
        """Store a peer's shared statistics beside its adapter stored in this run."""
        (folder,) = self._experts(run, [peer]).values()
        store_statistics(Path(folder), blobs)

    def _experts(self, run: str, names: list[str]) -> dict[str, str]:
        """{name: folder} of adapters stored in `run`, or Refused."""
        state = self._peers_state()
        if state.get("run") != run:
            raise Refused(f"site {self.name}: no adapters were exchanged in run {run}")
        unknown = sorted({check_name(n, "expert") for n in names} - set(state["order"]))
        if unknown:
            raise Refused(f"site {self.name}: no adapter stored for {unknown}")
        return {n: str(self.peer_folder(n)) for n in names}

    # ------------------------------------------------------------------------------------- score
    def _recipe_state(self, run: str, recipe: Any) -> dict[str, Any]:
        """The merged float32 weights of `recipe` over stored peers (refused: unknown or data-reading
        methods, unknown experts)."""
        from medmerge.merge import merged_state
        from medmerge.merge.registry import METHODS

        for source in RECIPE_SOURCES:  # e.g. a merge the coordinator built from secure sums (secure_site)
            stored = source(self, run, recipe)
            if stored is not None:
                return stored
        spec = METHODS.get(recipe.method)
        if spec is None or spec.needs_data:
            raise Refused(f"site {self.name}: method {shown(recipe.method)} is not merged here")
        folders = self._experts(run, list(recipe.experts))
        return merged_state(recipe.merge_config(self.config.base_model, folders))

    def _resident(self) -> Any:
        """The resident float32 base model whose weights each scored merge replaces."""
        from medmerge.models import load_model, resolve_model

        if "resident" not in self._cache:
            self._cache["resident"] = load_model(resolve_model(self.config.base_model))
        return self._cache["resident"]

    def _tokenizer(self) -> tuple[Any, str]:
        from medmerge.models import load_tokenizer, model_kind, resolve_model

        if "tokenizer" not in self._cache:
            base = resolve_model(self.config.base_model)
            self._cache["tokenizer"] = (load_tokenizer(base), model_kind(base))
        return self._cache["tokenizer"]

    def _validation_batches(self) -> tuple[list[Any], list[int]]:
        """The site's validation questions (the search's settings), encoded once."""
        if "validation" not in self._cache:
            self._cache["validation"] = validation_batches(self.config, self.specs, *self._tokenizer())
        return self._cache["validation"]

    def score(self, run: str, recipe: Any) -> tuple[float | None, int]:
        """(Σ nll in nats, or None where it is not finite; answer tokens) of the recipe's merge."""
        from medmerge.evaluate.scorer import load_weights

        if not self.specs:
            raise Refused(f"site {self.name}: no validation split (an evaluate-only node)")
        state = self._recipe_state(run, recipe)
        resident = self._resident()
        load_weights(resident, state)
        return self._loss(resident)

    def _loss(self, model: Any) -> tuple[float | None, int]:
        from medmerge.evaluate.scorer import per_question_loss

        nll, tokens = per_question_loss(model, *self._validation_batches())
        total = float(sum(nll))
        return (total if math.isfinite(total) else None), int(sum(tokens))

    # ------------------------------------------------------------------------------------ fedavg
    def fedavg(
        self, run: str, round_: int, local_steps: int, aggregate: bytes | None
    ) -> tuple[int | None, dict[str, bytes]]:
        """Add `aggregate` (the last round's average) to this run's global model once; then, at an
        expert site with local_steps > 0, train a fresh LoRA on it: (pairs, adapter) or (None, {})."""
        from medmerge.federated.fedavg import apply_aggregate
        from medmerge.models import resolve_model
        from medmerge.train import train_expert

        folder = self.out / "fedavg"
        state_file, current = folder / "applied.json", folder / "global"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("run") != run:  # another run's global model is never trained on
            shutil.rmtree(current, ignore_errors=True)
            state = {"run": run, "round": 0}
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(state_file, state)
        if aggregate is not None and state["round"] < round_:  # idempotent when a request is repeated
            source = current if current.is_dir() else resolve_model(self.config.base_model)
            apply_aggregate(source, aggregate, folder / "next")
            if current.is_dir():
                shutil.rmtree(current)
            (folder / "next").rename(current)
            write_json_atomic(state_file, {"run": run, "round": round_})
        steps = local_steps if self.role == "expert" else 0
        if not steps:
            return None, {}
        model = current if current.is_dir() else resolve_model(self.config.base_model)
        # a round's update is its last state (keep_best could hand back the zero update of LoRA's
        # initialisation), so its validation passes would be read by no one: one pair, not 256
        train = self.config.train_config(self.specs).model_copy(
            update={
                "model": str(model),
                "max_steps": steps,
                "seed": self.config.train.seed + round_,
                "checkpoint_every": 0,
                "eval_every": 0,
                "eval_examples": 1,
                "keep_best": False,
                "early_stopping_patience": None,
                "warmup_steps": min(self.config.train.warmup_steps, steps - 1),
            }
        )
        what = f"FedAvg round {round_}"  # DP: DP-SGD in every round, each charged to the site's ledger
        with budget_refusal(self):
            ledger = ledger_args(self, what)
            self._step(what, train_expert, train, folder / "update", overwrite=True, progress=False, **ledger)
        return self._pairs(), self._outgoing_adapter(folder / "update")

    # ---------------------------------------------------------------------------------- evaluate
    def _model(self, run: str, model: Any, resident: Any, dtype: str = "float32") -> tuple[Any, str | None]:
        """(the model, SHA-256 of its merged weights or None): "base", a stored peer, "fedavg" of this
        run, or a recipe over stored peers merged in memory into `resident`."""
        from medmerge.evaluate.scorer import load_weights
        from medmerge.models import load_model, resolve_model

        if not isinstance(model, str):
            state = self._recipe_state(run, model)
            load_weights(resident, state)
            return resident, state_digest(state)
        if model == "base":
            return load_model(resolve_model(self.config.base_model), dtype=dtype), None
        if model == "fedavg":
            state_file = self.out / "fedavg" / "applied.json"
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            if state.get("run") != run or not (self.out / "fedavg" / "global").is_dir():
                raise Refused(f"site {self.name}: no FedAvg model of run {run}")
            return load_model(self.out / "fedavg" / "global", dtype=dtype), None
        (folder,) = self._experts(run, [model]).values()
        return load_model(folder, dtype=dtype), None

    def _validation(self, run: str, models: dict[str, Any]) -> dict[str, dict[str, float]]:
        """{model: {nll_sum, tokens}} on the site's validation split (the search's settings)."""
        results = {}
        for name, model in models.items():
            nll, tokens = self._loss(self._model(run, model, self._resident())[0])
            if nll is None:
                raise MedmergeError(f"site {self.name}: validation loss of {name} is not finite")
            results[name] = {"nll_sum": nll, "tokens": tokens}
        return results

    def evaluate(
        self, run: str, models: dict[str, Any], validation: bool, domains: list[str]
    ) -> dict[str, Any]:
        """EvaluateReply fields: every model on the validation split (with `validation`) and on each of
        the site's sets in `domains`, with the metrics of `medmerge evaluate`."""
        from medmerge.evaluate.cache import EvalCache
        from medmerge.evaluate.records import ModelRef
        from medmerge.evaluate.runner import ModelRun, evaluate_cell, load_pairs
        from medmerge.models import load_model, resolve_model

        for name in models:
            check_name(name, "model name")
        checked = self._validation(run, models) if validation and self.specs else {}
        config, sets = self._sets(domains)
        pairs = {label: load_pairs(s, config) for label, s in sets}
        cells: dict[str, dict[str, Any]] = {label: {} for label, _ in sets}
        digests: dict[str, str] = {}
        tokenizer, kind = self._tokenizer()
        per_question = self.config.federation.per_question
        resident = load_model(resolve_model(self.config.base_model), dtype=config.dtype) if sets else None
        for name, model in models.items() if sets else ():
            scored, digest = self._model(run, model, resident, config.dtype)
            digests |= {name: digest} if digest else {}
            run_ = ModelRun(ModelRef(name, "", "", kind), tokenizer, config, EvalCache(None), False, scored)
            for label, s in sets:
                cells[label][name] = _wire(evaluate_cell(run_, s, pairs[label]), per_question)
        return {
            "validation": checked,
            "sets": [{"name": label, "domain": s.domain, "n": len(pairs[label])} for label, s in sets],
            "cells": cells,
            "merges": digests,
            "privacy": privacy_summary(self),
        }

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
    1 otherwise), the site's bootstrap intervals and corpus scores; per-question losses and their token
    weights only with `per_question` (never per-question generation or accuracy values, which would
    probe the reference answers). Never the answers or question ids. A value that is not finite fails
    the request (it cannot cross the wire)."""
    sums = {}
    for metric, values in cell.per_item.items():
        weights = cell.weights.get(metric) or [1.0] * len(values)
        sums[metric] = [sum(v * w for v, w in zip(values, weights, strict=True)), float(sum(weights))]
    out = {"metrics": {k: v.as_dict() for k, v in cell.metrics.items()}, "sums": sums, "corpus": cell.corpus}
    if per_question and "loss" in cell.per_item:
        out |= {"per_item": {"loss": cell.per_item["loss"]}, "weights": {"loss": cell.weights["loss"]}}
    return out


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a state dict's tensors (sorted by name; name, shape and float32 bytes of each)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def clean_adapter_config(data: bytes, base_id: str, strict: bool = True) -> bytes:
    """An adapter_config.json as it may cross the wire: base_model_name_or_path set to the study's base
    id, nothing but ADAPTER_CONFIG_KEYS. `strict` (on receipt): another key is refused (ValueError, naming
    it); otherwise (before sending) such keys are dropped. NaN and Infinity are refused."""
    config = loads(data)
    if not isinstance(config, dict):
        raise ValueError("adapter_config.json: not a JSON object")
    unknown = sorted(set(config) - ADAPTER_CONFIG_KEYS)
    if unknown and strict:
        raise ValueError(f"adapter_config.json: unexpected key {shown(unknown[0])}")
    kept = {k: v for k, v in config.items() if k in ADAPTER_CONFIG_KEYS}
    return json.dumps(kept | {"base_model_name_or_path": base_id}, indent=2, sort_keys=True).encode()


def adapter_digest(files: dict[str, bytes]) -> str:
    """SHA-256 of an adapter as exchanged: its weights, and its config without base_model_name_or_path
    (which each party re-points at its own copy of the base)."""
    config = {k: v for k, v in loads(files[ADAPTER_FILES[0]]).items() if k != "base_model_name_or_path"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(files[ADAPTER_FILES[1]])
    return digest.hexdigest()


def write_adapter(folder: Path, files: dict[str, bytes], base_model: str) -> Path:
    """Write an adapter (`files`: ADAPTER_FILES → bytes) into `folder` under those fixed names,
    re-pointed at `base_model` (its local folder when it is one)."""
    from medmerge.manifest import atomic_dir

    with atomic_dir(folder, overwrite=True) as tmp:
        config = loads(files[ADAPTER_FILES[0]])
        base = Path(base_model).expanduser()
        config["base_model_name_or_path"] = str(base.resolve()) if base.is_dir() else base_model
        (tmp / ADAPTER_FILES[0]).write_text(json.dumps(config, indent=2))
        (tmp / ADAPTER_FILES[1]).write_bytes(files[ADAPTER_FILES[1]])
    return folder


def store_statistics(folder: Path, files: dict[str, bytes]) -> Path:
    """Write shared statistics (`files`: STATISTICS_FILES → bytes) into `folder`, beside an adapter: an
    old record removed, the tensor file, then its record (statistics.json, the commit record, last: as
    medmerge.site_stats writes them, so a half-written pair is never read)."""
    (folder / STATISTICS_FILES[1]).unlink(missing_ok=True)
    for file in STATISTICS_FILES:
        tmp = folder / f".{file}.tmp"
        tmp.write_bytes(files[file])
        tmp.replace(folder / file)
    return folder
