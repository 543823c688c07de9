"""CTranslate2 conversion of a local Hugging Face folder (Llama-family causal models and T5).

Guards against the tied-embedding trap: transformers 5.x forces `tie_word_embeddings=True` on T5 configs,
and ctranslate2's T5 converter then multiplies decoder outputs by d_model^-0.5 (the tied-T5 rescaling)
although the checkpoint (e.g. flan-t5) is untied. The converter here compares the loaded config with the
folder's own config.json, restores the declared value, and the agreement check verifies it numerically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.extras import require

log = logging.getLogger(__name__)

CT2_QUANTIZATIONS = (
    "float32",
    "int8",
    "int8_float32",
    "bfloat16",
    "int8_bfloat16",
    "float16",
    "int8_float16",
)


def check_ct2_quantization(quantization: str) -> None:
    """Raise unless `quantization` is a CTranslate2 weight type."""
    if quantization not in CT2_QUANTIZATIONS:
        raise MedmergeError(
            f"--quant {quantization!r}: unknown for ct2 (choices: {', '.join(CT2_QUANTIZATIONS)})"
        )


def declared_tie(folder: Path, model_type: str) -> bool:
    """`tie_word_embeddings` as the folder's config.json declares it (the config class default if absent)."""
    from transformers import AutoConfig

    raw = json.loads((folder / "config.json").read_text())
    if "tie_word_embeddings" in raw:
        return bool(raw["tie_word_embeddings"])
    return bool(AutoConfig.for_model(model_type).tie_word_embeddings)


def guard_tied_embeddings(model: Any, folder: Path) -> dict[str, Any]:
    """Make the loaded model's tie flag match the folder's config.json; refuse if weights were tied away.

    Returns {"tie_word_embeddings": bool, "tie_flag_restored": bool} for the manifest.
    """
    declared = declared_tie(folder, model.config.model_type)
    loaded = bool(getattr(model.config, "tie_word_embeddings", declared))
    if loaded == declared:
        return {"tie_word_embeddings": declared, "tie_flag_restored": False}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not declared and head is not None and head.weight.data_ptr() == embed.weight.data_ptr():
        raise MedmergeError(
            f"{folder}/config.json: declares untied embeddings but the loaded model shares lm_head with the "
            "input embeddings (a transformers version that forces tying?); refusing to convert"
        )
    log.warning(
        "%s: loaded tie_word_embeddings=%s, config.json says %s; using config.json", folder, loaded, declared
    )
    model.config.tie_word_embeddings = declared
    return {"tie_word_embeddings": declared, "tie_flag_restored": True}


def convert_ct2(source: Path, out: Path, quantization: str) -> dict[str, Any]:
    """Convert the Hugging Face folder `source` into a CTranslate2 model in the (new, empty) folder `out`."""
    require("export --format ct2", "ctranslate2")
    from ctranslate2.converters import TransformersConverter

    check_ct2_quantization(quantization)
    notes: dict[str, Any] = {}

    class FaithfulConverter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            notes.update(guard_tied_embeddings(model, Path(model_name_or_path)))
            return model

    try:
        FaithfulConverter(str(source), low_cpu_mem_usage=True).convert(
            str(out), quantization=quantization, force=True
        )
    except (ValueError, NotImplementedError) as exc:
        raise MedmergeError(f"{source}: CTranslate2 cannot convert this model ({exc})") from None
    return notes
