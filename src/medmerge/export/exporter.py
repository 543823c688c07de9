"""`medmerge export`: convert, check the converted model against PyTorch, write the folder atomically.

Output folder (renamed into place only after the agreement check passed):
    ct2:  model.bin, vocabulary.json, config.json (CTranslate2's) + tokenizer files
    gguf: model-<quant>.gguf + tokenizer files + Modelfile (Ollama)
    both: source_config.json (the Hugging Face config), medmerge-export.json, the manifest: source
          checksum, format, quantization, file sizes (bytes) and size ratio, agreement numbers, versions;
          and the model card README.md (medmerge.model_card).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medmerge.errors import MedmergeError
from medmerge.export.agreement import TOLERANCES, measure_agreement, precision_class, require_agreement
from medmerge.export.common import EXPORT_MANIFEST, llama_cpp_available
from medmerge.export.engines import open_engine
from medmerge.manifest import atomic_dir, build_manifest, checksum, write_json_atomic
from medmerge.model_card import export_card, write_model_card

log = logging.getLogger(__name__)

FORMATS = ("ct2", "gguf")
DEFAULT_QUANT = {"ct2": "int8_float32", "gguf": "q8_0"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "generation_config.json",
)


def copy_tokenizer(source: Path, out: Path) -> None:
    """Copy the tokenizer (and generation config) files of `source` into `out`; the HF config is kept
    as source_config.json because CTranslate2 writes its own config.json."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    shutil.copy2(source / "config.json", out / "source_config.json")


def folder_sizes(folder: Path) -> dict[str, int]:
    """Bytes of each file in `folder` (not recursive)."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files (safetensors, bin, gguf) of a model folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))


@contextlib.contextmanager
def _plain_folder(model: str):
    """The Hugging Face folder of `model`; an adapter is merged into its base in a temporary folder."""
    from medmerge.models import is_adapter, load_model, load_tokenizer, resolve_model

    path = resolve_model(model)
    if not is_adapter(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="medmerge-merged-") as tmp:
        load_model(path).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(path).save_pretrained(tmp)
        yield Path(tmp)


def export_model(
    model: str,
    fmt: str,
    out: str | Path,
    *,
    quantization: str | None = None,
    overwrite: bool = False,
    n_tokens: int = 16,
    min_match: float | None = None,
    max_mean_logprob_diff: float | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export `model` to `out` in format `fmt` and return the manifest; raise if outputs diverge.

    `threads` sets torch's and the exported engine's thread count for the agreement check.
    """
    from medmerge.export.ct2 import check_ct2_quantization, convert_ct2
    from medmerge.export.gguf import check_gguf_quantization, write_gguf, write_modelfile
    from medmerge.export.torch_engine import TorchEngine
    from medmerge.models import model_kind

    if fmt not in FORMATS:
        raise MedmergeError(f"--format {fmt!r}: unknown (choices: {', '.join(FORMATS)})")
    quantization = quantization or DEFAULT_QUANT[fmt]
    (check_ct2_quantization if fmt == "ct2" else check_gguf_quantization)(quantization)
    default_match, default_diff = TOLERANCES[precision_class(quantization)]
    min_match = default_match if min_match is None else min_match
    max_mean_logprob_diff = default_diff if max_mean_logprob_diff is None else max_mean_logprob_diff
    out = Path(out)

    with _plain_folder(model) as source, atomic_dir(out, overwrite=overwrite) as tmp:
        kind = model_kind(source)
        config = json.loads((source / "config.json").read_text())
        gguf_file = f"model-{quantization}.gguf" if fmt == "gguf" else None
        if fmt == "ct2":
            notes = convert_ct2(source, tmp, quantization)
        else:
            notes = write_gguf(source, tmp / gguf_file, quantization, exported_as=str(model))
            write_modelfile(tmp, gguf_file, source, name=Path(str(model)).name)
        copy_tokenizer(source, tmp)
        manifest = build_manifest(
            "export",
            inputs={"model": str(model), "path": str(source), "checksum": checksum(source)},
            config={"format": fmt, "quantization": quantization, "n_tokens": n_tokens},
            format=fmt,
            quantization=quantization,
            model_kind=kind,
            gguf_file=gguf_file,
            eos_token_id=config.get("eos_token_id"),
            context_length=config.get("max_position_embeddings") or config.get("n_positions"),
            conversion=notes,
        )
        write_json_atomic(tmp / EXPORT_MANIFEST, manifest)  # open_engine reads format and kind from it

        reference = TorchEngine(source, threads=threads)
        engines = ["ct2"] if fmt == "ct2" else ["torch"] + (["llama.cpp"] if llama_cpp_available() else [])
        agreements = {}
        for engine_name in engines:
            exported = open_engine(tmp, engine_name, threads=threads)
            agreement = measure_agreement(
                reference, exported, n_tokens=n_tokens, min_match=min_match,
                max_mean_logprob_diff=max_mean_logprob_diff,
            )  # fmt: skip
            log.info("%s", agreement.summary())
            require_agreement(agreement, f"{out} ({fmt} {quantization}, {agreement.engine})")
            agreements[agreement.engine] = agreement.as_dict()
            del exported
        sizes = folder_sizes(tmp)
        exported_weights = weight_bytes(tmp)
        manifest["agreement"] = agreements
        manifest["sizes"] = {
            "files": sizes,
            "total_bytes": sum(sizes.values()),
            "weights_bytes": exported_weights,
            "source_weights_bytes": weight_bytes(source),
            "weights_ratio": round(exported_weights / max(weight_bytes(source), 1), 4),
        }
        if fmt == "gguf":
            manifest["gguf_check"] = (
                "file read back and dequantized by transformers (checks the file's weights and metadata)"
                + (
                    "; also run by llama.cpp"
                    if "llama.cpp" in engines
                    else "; llama.cpp runtime not installed"
                )
            )
        write_json_atomic(tmp / EXPORT_MANIFEST, manifest)
        write_model_card(tmp, export_card(manifest))
    return manifest
