"""Trainable models for the three methods: full fine-tuning, LoRA, and QLoRA on a frozen 4-bit NF4 base.

full   every parameter of the base trains (float32 master weights).
lora   the base is frozen; each adapted Linear computes W·x + (alpha/r)·B·A·dropout(x)
       (alpha/√r with rsLoRA; DoRA also learns a per-output magnitude). B starts at 0, so step 0 = base.
qlora  as lora, but the frozen base Linear weights are stored in 4-bit NF4 (bitsandbytes, blocks of 64
       with one absmax scale each) and dequantised on the fly; norms, embeddings and the head stay float32.

base_dtype (lora): under bf16 autocast the frozen base Linear weights are held in bfloat16 (the dtype
their matmuls use anyway) instead of being re-cast from float32 on every forward; LoRA A/B, norms,
embeddings and a tied head stay float32, and saved adapters are float32 PEFT files as before.

dropout_rng (lora/qlora): `counter` swaps PEFT's nn.Dropout for CounterDropout (same law, masks from a
parallel counter-based hash; see medmerge.train.dropout), which on a CPU is 2–3× cheaper per call.

bitsandbytes 0.50.2 on CPUs with avx512_bf16 repacks 4-bit weights into an inference-only layout after a
no-grad eval forward, after which LoRA parameters silently get no gradient. `patch_linear4bit` turns
that path off on every `Linear4bit`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from medmerge.config import LoraSettings, TrainConfig
from medmerge.errors import MedmergeError
from medmerge.extras import require
from medmerge.models import ModelKind, load_model, model_kind, resolve_model
from medmerge.train.dropout import use_counter_dropout

log = logging.getLogger("medmerge.train")


def linear_names(model: torch.nn.Module) -> list[str]:
    """Sorted leaf names (last path component) of every Linear layer (4-bit ones included)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}


def check_target_modules(model: torch.nn.Module, targets: list[str] | str) -> None:
    """Every requested target must name (as a suffix of a module path) at least one Linear layer."""
    if targets == "all-linear":
        return
    if not targets:
        raise MedmergeError("lora.target_modules: empty list (expected module names, or all-linear)")
    linear_paths = [name for name, m in model.named_modules() if _is_linear(m)]
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in linear_paths)]
    if missing:
        raise MedmergeError(
            f"lora.target_modules: {', '.join(missing)} match no Linear layer of the model "
            f"(choices: {', '.join(linear_names(model))}, or all-linear)"
        )


def patch_linear4bit(model: torch.nn.Module) -> int:
    """Disable bitsandbytes' avx512-bf16 inference repacking on every Linear4bit; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def resolve_kind(config: TrainConfig, path: Path) -> ModelKind:
    """The model's kind, checked against the config's `kind` when it names one."""
    kind = model_kind(path)
    if config.kind != "auto" and config.kind != kind:
        raise MedmergeError(
            f"kind: config asks for a {config.kind} model but {config.model} is a {kind} model "
            f"(set kind: {kind} or auto)"
        )
    return kind


def load_base(config: TrainConfig, path: Path, kind: ModelKind, device: torch.device) -> Any:
    """The base model for `config.method`: float32, or 4-bit NF4 for qlora."""
    if config.method != "qlora":
        return load_model(path).to(device)
    require("method: qlora", "bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=config.qlora_double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if _bf16(config, device) else torch.float32,
    )
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(
        path, quantization_config=quant, dtype=torch.float32, device_map={"": device}
    )
    if patch_linear4bit(model) == 0:
        raise MedmergeError(f"{path}: no Linear layer was quantised to 4-bit (qlora needs Linear layers)")
    return model


def _bf16(config: TrainConfig, device: torch.device) -> bool:
    from medmerge.train.precision import use_bf16_autocast

    return use_bf16_autocast(config.autocast, device)


def lora_config(settings: LoraSettings, kind: ModelKind, base_name: str):
    """The PEFT LoraConfig of `settings`; base_model_name_or_path is what the user named."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        base_model_name_or_path=base_name,
    )


def build_model(config: TrainConfig, device: torch.device) -> tuple[Any, ModelKind, Path]:
    """The trainable model of `config` (train mode), its kind, and the resolved base folder."""
    path = resolve_model(config.model)
    kind = resolve_kind(config, path)
    model = load_base(config, path, kind, device)
    if config.method == "full":
        model.requires_grad_(True)
    else:
        from peft import get_peft_model

        check_target_modules(model, config.lora.target_modules)
        model.requires_grad_(False)
        with warnings.catch_warnings():  # PEFT warns that the base path differs from the name we record
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
            model = get_peft_model(model, lora_config(config.lora, kind, config.model))
        model.peft_config["default"].base_model_name_or_path = config.model
        if config.method == "qlora":
            patch_linear4bit(model)
        if resolve_base_dtype(config, device) == torch.bfloat16:
            cast_frozen_linears(model, torch.bfloat16)
        if config.dropout_rng == "counter":
            use_counter_dropout(model)
    model.config.use_cache = False
    model.train()
    return model, kind, path


def resolve_base_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """dtype of the frozen base Linear weights for `config` (see TrainConfig.base_dtype).

    Under bf16 autocast every Linear runs its matmul in bfloat16 anyway, so a float32 frozen weight is
    re-cast to bfloat16 on every forward (frozen tensors are not in autocast's cast cache): holding it
    in bfloat16 once gives the same matmul operands and saves that traffic and the float32 copy.
    """
    bf16 = _bf16(config, device)
    if config.base_dtype == "float32" or config.method == "full":
        if config.base_dtype == "bfloat16":
            raise MedmergeError("base_dtype: bfloat16 applies to lora/qlora (full trains float32 weights)")
        return torch.float32
    if config.base_dtype == "bfloat16":
        if not bf16:
            raise MedmergeError("base_dtype: bfloat16 needs bf16 autocast (set autocast: bf16 or auto)")
        return torch.bfloat16
    return torch.bfloat16 if bf16 and config.method == "lora" and not config.lora.use_dora else torch.float32


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen float32 nn.Linear (weight and bias) to `dtype`; returns how many.

    Trainable Linears (LoRA A/B) and Linears sharing their weight with the input embedding (a tied
    head, which the embedding lookup also reads) keep float32; 4-bit layers are not nn.Linear.
    """
    embedding = model.get_input_embeddings()
    tied = embedding.weight if embedding is not None else None
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or module.weight is tied:
            continue
        if module.weight.dtype != torch.float32:
            continue
        module.to(dtype)
        count += 1
    return count


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name → detached tensor of every trainable parameter (the state a checkpoint must keep)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
