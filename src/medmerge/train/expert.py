"""`train_expert(config, out_dir)`: check everything, train, and write the expert folder atomically.

The expert folder holds the PEFT adapter (adapter_config.json + adapter_model.safetensors, whose
base_model_name_or_path is the absolute folder of the base, so PEFT loads it offline; the name the config
gives stays in manifest.json) or the full model (safetensors + config), the tokenizer, curve.csv /
curve.png, the model card README.md (medmerge.model_card), and manifest.json (base checksum, data SPECs
and split fingerprints, config, versions, final metrics). Checkpoints live in `<out>.checkpoint/` until
the run completes.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medmerge.config import TrainConfig
from medmerge.errors import MedmergeError
from medmerge.manifest import atomic_dir, build_manifest, checksum, sha256_file, write_json_atomic
from medmerge.model_card import expert_card, write_model_card
from medmerge.models import load_tokenizer, resolve_model
from medmerge.train import checkpoint as ckpt
from medmerge.train.curve import plot_curve, write_curve_csv
from medmerge.train.dp import round_significant
from medmerge.train.examples import TrainData, prepare_data
from medmerge.train.ledger import PrivacyLedger
from medmerge.train.loop import LoopState, Trainer
from medmerge.train.model import build_model, resolve_kind
from medmerge.train.precision import (
    Runtime,
    reuse_freed_memory,
    start_runtime,
    stop_runtime,
    use_bf16_autocast,
)
from medmerge.train.privacy import PrivateTrainer, privacy_card


def train_expert(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    hooks: list[Any] | None = None,
    ledger: str | Path | None = None,
    release: str = "expert",
) -> Path:
    """Fine-tune `config.model` on `config.data` with `config.method`; return the expert folder.

    Runs alone or as one process of `torchrun` (WORLD_SIZE > 1: DDP, each process its own data shard,
    only rank 0 writes). `resume` continues from `<out>.checkpoint/`. Bad input is a MedmergeError
    raised before any training step.

    DP (`config.privacy`): `ledger` is the site's folder whose privacy ledger (medmerge.train.ledger)
    this training is charged to, as the release named `release` ("expert", "FedAvg round 3"): the
    planned run is checked against `privacy.budget` before the first step, and the steps done are
    charged before the expert is written. Without a ledger, `privacy.budget` caps this run alone.
    """
    out_dir = Path(out_dir)
    runtime = start_runtime()
    try:
        with reuse_freed_memory(runtime.device.type == "cpu"):
            site = (Path(ledger), release) if ledger is not None else (None, release)
            folder = _train(config, out_dir, runtime, resume, overwrite, progress, hooks or [], site)
            # what a reference cycle still holds of this training (torch's first lazy import keeps a
            # traceback) is freed now, before the trim, not at the next step's full collection
            gc.collect()
            return folder
    finally:
        stop_runtime(runtime)


def _model_reference(name: str) -> str:
    """What adapters record as their base: an embedded name as is, a folder as an absolute path."""
    return name if not Path(name).expanduser().is_dir() else str(Path(name).expanduser().resolve())


def _train(
    config: TrainConfig,
    out_dir: Path,
    runtime: Runtime,
    resume: bool,
    overwrite: bool,
    progress: bool,
    hooks: list[Any],
    site: tuple[Path | None, str] = (None, "expert"),
) -> Path:
    checkpoints = ckpt.checkpoint_dir(out_dir)
    if out_dir.exists() and not overwrite:
        raise MedmergeError(f"{out_dir}: output already exists (pass --overwrite to replace it)")
    if checkpoints.exists() and not resume and not overwrite:
        raise MedmergeError(
            f"{checkpoints}: a checkpoint of an unfinished run exists (pass --resume or --overwrite)"
        )
    config = config.model_copy(update={"model": _model_reference(config.model)})
    base_path = resolve_model(config.model)
    kind = resolve_kind(config, base_path)
    tokenizer = load_tokenizer(base_path)
    data = prepare_data(config, tokenizer, kind)  # empty splits fail here, before the model loads
    torch.manual_seed(config.seed)
    model, kind, base_path = build_model(config, runtime.device)
    bf16 = use_bf16_autocast(config.autocast, runtime.device)
    private = {"groups": data.train_groups} if config.privacy is not None else {}
    loop = PrivateTrainer if config.privacy is not None else Trainer
    trainer = loop(
        config, model, kind, data.train, data.validation, tokenizer.pad_token_id, runtime, bf16, **private
    )
    ledger = _ledger(trainer, site[0]) if isinstance(trainer, PrivateTrainer) else None
    if ledger is not None:  # refused before the first step if the planned run would pass the budget
        ledger.check(trainer.planned_release(site[1]))
    trainer.hooks.extend(hooks)
    if resume:
        loop_state, trainer.best_state = ckpt.load_checkpoint(
            checkpoints,
            model=model,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            rank=runtime.rank,
            device=runtime.device,
        )
        if loop_state.get("config") != config.model_dump(mode="json"):
            raise MedmergeError(f"{checkpoints}: made with a different config (resume needs the same one)")
        trainer.stream.load_state(loop_state["stream"])
        trainer.state = LoopState(**loop_state["loop"])
    elif runtime.main and checkpoints.exists():
        shutil.rmtree(checkpoints)

    def save(t: Trainer) -> None:
        states = _gather_rng(runtime)
        if runtime.main:
            ckpt.save_checkpoint(
                checkpoints,
                model=t.model,
                optimizer=t.optimizer,
                scheduler=t.scheduler,
                rng_states=states,
                best_state=t.best_state,
                state={
                    "config": config.model_dump(mode="json"),
                    "stream": t.stream.state(),
                    "loop": t.state.to_json(),
                },
            )
        _barrier(runtime)

    started = time.time()
    state = trainer.run(save, progress=progress)
    if ledger is not None and site[0] is not None and runtime.main:  # charged before it is written
        ledger.charge(trainer.release(site[1]))
    if runtime.main:
        record = ExpertRecord(config, model, tokenizer, base_path, data, state, runtime, bf16, started)
        _write_expert(record, out_dir, overwrite)
        shutil.rmtree(checkpoints, ignore_errors=True)
    _barrier(runtime)
    return out_dir


def _ledger(trainer: PrivateTrainer, folder: Path | None) -> PrivacyLedger | None:
    """The site's ledger (loaded from `folder`), or an unsaved one that caps this run alone where
    only `privacy.budget` is set; None where neither applies."""
    settings = trainer.settings
    if folder is None and settings.budget is None:
        return None
    if folder is None:
        return PrivacyLedger(Path("."), trainer.delta, settings.accountant, settings.budget)
    return PrivacyLedger.load(
        folder, budget=settings.budget, delta=trainer.delta, accountant=settings.accountant
    )


def _gather_rng(runtime: Runtime) -> list[dict[str, torch.Tensor]]:
    mine = ckpt.rng_state(runtime.device)
    if not runtime.distributed:
        return [mine]
    import torch.distributed as dist

    gathered: list[Any] = [None] * runtime.world
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in mine.items()})
    return gathered


def _barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()


@dataclass(frozen=True)
class ExpertRecord:
    """What a finished training writes into its expert folder."""

    config: TrainConfig
    model: Any  # the trained (unwrapped) model: PEFT model or full transformers model
    tokenizer: Any
    base_path: Path
    data: TrainData
    state: LoopState
    runtime: Runtime
    bf16: bool
    started: float  # time.time() when the training began


def _data_record(sources: list[dict[str, Any]], private: bool) -> list[dict[str, Any]]:
    """The manifest's data record: beside a DP expert, the fingerprints (of ids) only, not the raw
    file's SHA-256 (a membership test for whoever guesses the file)."""
    return [{k: v for k, v in s.items() if k != "sha256"} for s in sources] if private else sources


def _throughput(state: LoopState, private: bool) -> dict[str, Any]:
    """Token count and rate; beside a DP expert no exact token count, the rate to 2 significant figures."""
    rate = state.tokens / max(state.elapsed_s, 1e-9)
    if private:
        return {
            "tokens": None,
            "tokens_per_s": round_significant(rate, 2),
            "tokens_rounding": "2 significant",
        }
    return {"tokens": state.tokens, "tokens_per_s": rate}


def _write_expert(record: ExpertRecord, out_dir: Path, overwrite: bool) -> None:
    config, model, tokenizer, base_path = record.config, record.model, record.tokenizer, record.base_path
    data, state, started = record.data, record.state, record.started
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        # medmerge never resizes the vocabulary; "auto" would make PEFT look the embedded model's name
        # up on the Hugging Face hub (slow retries offline) to find out.
        save = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        model.save_pretrained(tmp, safe_serialization=True, **save)
        if save:  # PEFT resolves the base offline only from a folder: record its absolute path
            adapter_config = json.loads((tmp / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = str(base_path.resolve())
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        write_curve_csv(state.curve, tmp / "curve.csv")
        plot_curve(state.curve, tmp / "curve.png", f"{config.method} on {', '.join(config.data.specs)}"[:90])
        base_files = sorted(base_path.glob("*.safetensors"))
        manifest = build_manifest(
            "expert",
            inputs={
                "base_model": config.model,
                "base_path": str(base_path),
                "base_checksum": checksum(base_path),
                "base_weights_sha256": {f.name: sha256_file(f) for f in base_files},
                "data": _data_record(data.sources, private=config.privacy is not None),
            },
            config=config,
            metrics={
                "val_loss_initial": state.initial_val,
                "val_loss_final": state.last_val,
                "val_loss_best": state.best_val,
                "best_step": state.best_step,
                "kept": "best" if config.keep_best else "last",
                "steps": state.step,
                "stopped_because": state.stopped_because,
                "train_loss_last": next(
                    (r["train_loss"] for r in reversed(state.curve) if "train_loss" in r), None
                ),
                **_throughput(state, private=config.privacy is not None),
                "loop_minutes": state.elapsed_s / 60,
                "wall_minutes": (time.time() - started) / 60,
                "train_examples": len(data.train),
                "validation_examples": len(data.validation),
            },
            method=config.method,
            trainable_parameters=trainable,
            total_parameters=total,
            processes=record.runtime.world,
            bf16_autocast=record.bf16,
            device=str(record.runtime.device),
            privacy=state.privacy,
        )
        write_model_card(tmp, expert_card(manifest, base_path))
        privacy_card(tmp, state.privacy)
        write_json_atomic(tmp / "manifest.json", manifest)
