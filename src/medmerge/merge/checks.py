"""Checks run before any tensor is read: same architecture, same tensor names and shapes, same vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from medmerge.errors import MedmergeError
from medmerge.merge.sources import Source

_ARCH_KEYS = ("model_type", "architectures", "is_encoder_decoder")


def check_architecture(sources: list[Source]) -> None:
    """Every input's config.json agrees on model_type, architectures and is_encoder_decoder."""
    reference = sources[0]
    for other in sources[1:]:
        for key in _ARCH_KEYS:
            a, b = reference.config.get(key), other.config.get(key)
            if a is not None and b is not None and a != b:
                raise MedmergeError(
                    f"{other.path}: config.json {key} is {b!r} but {reference.path} has {a!r} "
                    "(same architecture needed)"
                )


def check_tensors(sources: list[Source]) -> None:
    """Every input has exactly the reference's tensor names with the same shapes; names the first mismatch."""
    reference = sources[0]
    names = reference.infos
    for other in sources[1:]:
        missing = [n for n in names if n not in other.infos]
        extra = [n for n in other.infos if n not in names]
        if missing or extra:
            which, name = ("lacks", missing[0]) if missing else ("has extra tensor", extra[0])
            hint = ""
            if name.startswith("lm_head"):
                hint = " (one model ties lm_head to the input embeddings and the other does not)"
            raise MedmergeError(
                f"{other.path}: {which} {name} compared with {reference.path}{hint} "
                f"({len(missing)} missing, {len(extra)} extra)"
            )
        for name, info in names.items():
            shape = other.infos[name].shape
            if shape != info.shape:
                raise MedmergeError(
                    f"{other.path}: tensor {name} has shape {list(shape)} "
                    f"but {reference.path} has {list(info.shape)}"
                )


def _vocabulary(path: Path) -> dict[str, int] | None:
    """token → id from tokenizer.json (model vocab plus added tokens), or None without one."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, list):  # unigram (sentencepiece): [[piece, score], …]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    vocab = dict(vocab or {})
    for token in data.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
    return vocab


def check_vocabulary(sources: list[Source]) -> None:
    """Same vocab_size in config.json, and the same token ↔ id map where tokenizer.json files exist.

    A difference is reported token by token (the first five).
    """
    reference = sources[0]
    size = reference.config.get("vocab_size")
    for other in sources[1:]:
        other_size = other.config.get("vocab_size")
        if size is not None and other_size is not None and size != other_size:
            raise MedmergeError(f"{other.path}: vocab_size {other_size} but {reference.path} has {size}")
    full = [s for s in sources if not s.is_adapter and (s.path / "tokenizer.json").is_file()]
    if len({(s.path / "tokenizer.json").read_bytes() for s in full}) <= 1:
        return  # byte-identical tokenizer files (the usual case): nothing to parse
    vocabs = [(s.path, _vocabulary(s.path)) for s in full]
    vocabs = [(p, v) for p, v in vocabs if v is not None]
    if len(vocabs) < 2:
        return
    ref_path, ref = vocabs[0]
    for path, vocab in vocabs[1:]:
        if vocab == ref:
            continue
        diffs = [
            f"{token!r}: id {ref.get(token)} vs {vocab.get(token)}"
            for token in sorted(set(ref) | set(vocab))
            if ref.get(token) != vocab.get(token)
        ]
        raise MedmergeError(
            f"{path}: tokenizer differs from {ref_path} on {len(diffs)} tokens: " + "; ".join(diffs[:5])
        )
