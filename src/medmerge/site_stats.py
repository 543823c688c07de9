"""Site statistics for data-aware merges (RegMean, Fisher merging): the file format, its writer and reader.

An expert folder may hold two files beside its weights (written by `medmerge stats`,
`medmerge.train.statistics`; read by the merge methods that use them):

statistics.safetensors   float32 tensors, one per (kind, weight), keyed `<kind>::<weight name>`:
    gram::<weight name>     (in, in)   G = Σ_tokens x xᵀ of the input x of that nn.Linear
    fisher::<weight name>   (out, in)  F = mean over examples of (∂ log p(answer | question) / ∂W)²,
                                       W the full weight (W₀ + scale·B·A for a LoRA expert)
  <weight name> is the tensor's name in the BASE model's safetensors (`model.layers.0.mlp.down_proj.weight`),
  never PEFT's wrapped names (`base_model.model.….base_layer.weight`).
statistics.json          {"format": "medmerge-statistics/1", "examples", "tokens", "kinds", "bytes",
                          "sha256", "dtype": "float32", "aliases", "data", "model", …}

Aliases. Linears that read the same input tensor (q/k/v; gate/up; a seq2seq decoder's cross-attention k/v,
which all read the encoder output) have identical Gram matrices, so each is stored once:
`aliases` maps a weight name to the weight name whose `gram::` tensor is stored. `SiteStatistics.read`
resolves an alias (one step; an alias never points at another alias) and returns the same numbers as if
the tensor had been stored under its own name; `names(kind)` lists aliased names too.

Atomicity. Both files are first written under hidden temporary names; then a previous statistics.json is
removed, statistics.safetensors is renamed into place, and statistics.json last. statistics.json is the
commit record: a reader without it sees no statistics, and its `bytes` must equal the tensor file's size,
so a crash never leaves a readable half-written pair.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medmerge.errors import MedmergeError
from medmerge.manifest import STATISTICS_FILES, checksum, sha256_file

FORMAT = "medmerge-statistics/1"
TENSORS_FILE = "statistics.safetensors"
INFO_FILE = "statistics.json"
assert STATISTICS_FILES == {TENSORS_FILE, INFO_FILE}  # what model checksums leave out (medmerge.manifest)
KINDS = ("gram", "fisher")
SEPARATOR = "::"


def tensor_key(kind: str, weight_name: str) -> str:
    """`gram::model.layers.0.mlp.down_proj.weight`: the key of one statistic in statistics.safetensors."""
    if kind not in KINDS:
        raise MedmergeError(f"statistics kind {kind!r}: unknown (expected one of {', '.join(KINDS)})")
    return f"{kind}{SEPARATOR}{weight_name}"


def expert_checksum(folder: str | Path) -> str:
    """SHA-256 of an expert folder's weights and configs, leaving out medmerge's records and statistics.

    `statistics.json["model"]["checksum"]` holds it, so a reader can check that the statistics describe
    the weights beside them (adding statistics to a folder does not change this checksum).
    """
    return checksum(folder)


def has_statistics(folder: str | Path) -> bool:
    """True where `folder` holds a committed statistics.json (see the module doc)."""
    return (Path(folder) / INFO_FILE).is_file()


def _tensor_table(
    grams: Mapping[str, torch.Tensor], fishers: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    for name, target in aliases.items():
        if name in grams or target not in grams:
            raise ValueError(f"gram alias {name} -> {target}: expected a stored target and an unstored name")
    tensors = {}
    for kind, table in (("gram", grams), ("fisher", fishers)):
        for name, tensor in table.items():
            if kind == "gram" and (tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]):
                raise ValueError(f"gram of {name}: expected a square matrix, got {tuple(tensor.shape)}")
            tensors[tensor_key(kind, name)] = tensor.detach().to("cpu", torch.float32).contiguous()
    return tensors


def write_statistics(
    folder: str | Path,
    grams: Mapping[str, torch.Tensor],
    fishers: Mapping[str, torch.Tensor],
    info: Mapping[str, Any],
    *,
    aliases: Mapping[str, str] | None = None,
) -> Path:
    """Write statistics.safetensors + statistics.json into `folder` atomically; returns the json path.

    `grams` / `fishers` map base weight names to tensors (stored float32; either may be empty);
    `aliases` maps a Gram's weight name to the stored weight name with the same Gram. `info` carries the
    caller's record (examples, tokens, data, model, …); format, kinds, bytes, sha256, dtype and aliases
    are filled in here. A previous pair of statistics files is replaced.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    aliases = dict(aliases or {})
    tensors = _tensor_table(grams, fishers, aliases)
    kinds = [k for k, table in (("gram", grams), ("fisher", fishers)) if table]
    if not kinds:
        raise ValueError("write_statistics: no statistics to write")
    folder.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []
    try:
        for suffix in (".safetensors.tmp", ".json.tmp"):
            fd, tmp = tempfile.mkstemp(prefix=".statistics.", suffix=suffix, dir=folder)
            os.close(fd)
            temps.append(tmp)
        tensors_tmp, info_tmp = temps
        save_file(tensors, tensors_tmp, metadata={"format": FORMAT})
        record = {
            **info,
            "format": FORMAT,
            "kinds": kinds,
            "dtype": "float32",
            "bytes": os.path.getsize(tensors_tmp),
            "sha256": sha256_file(tensors_tmp),
            "aliases": dict(sorted(aliases.items())),
        }
        with open(info_tmp, "w") as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / INFO_FILE)  # from here until the last rename: no statistics at all
        os.replace(tensors_tmp, folder / TENSORS_FILE)
        os.replace(info_tmp, folder / INFO_FILE)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return folder / INFO_FILE


class SiteStatistics:
    """A lazy reader of one folder's statistics: tensors are read one at a time, on request.

    >>> with SiteStatistics.open(expert) as stats:
    ...     if stats.has("gram"):
    ...         g = stats.read("gram", "model.layers.0.self_attn.q_proj.weight")  # (576, 576) or None
    """

    def __init__(self, folder: Path, info: dict[str, Any], handle: Any, keys: set[str]) -> None:
        self.folder = folder
        self._info = info
        self._handle = handle
        self._keys = keys
        self._aliases: dict[str, str] = dict(info.get("aliases") or {})

    @classmethod
    def open(cls, folder: str | Path) -> SiteStatistics:
        """Open `folder`'s statistics; a missing, unknown or corrupt file is a one-line MedmergeError."""
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        info_path, tensors_path = folder / INFO_FILE, folder / TENSORS_FILE
        if not info_path.is_file():
            raise MedmergeError(
                f"{info_path}: not found (make site statistics with: medmerge stats {folder})"
            )
        try:
            info = json.loads(info_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MedmergeError(f"{info_path}: unreadable statistics record ({exc})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            found = info.get("format") if isinstance(info, dict) else type(info).__name__
            raise MedmergeError(f"{info_path}: format {found!r} (expected {FORMAT!r})")
        if not tensors_path.is_file():
            raise MedmergeError(f"{tensors_path}: missing (its record {info_path.name} names it)")
        size = tensors_path.stat().st_size
        if size != info.get("bytes"):
            raise MedmergeError(
                f"{tensors_path}: {size} bytes, but {info_path.name} records {info.get('bytes')} "
                "(half-written or replaced; make the statistics again)"
            )
        try:
            handle = safe_open(str(tensors_path), framework="pt")
            keys = set(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise MedmergeError(f"{tensors_path}: corrupt safetensors file ({exc})") from None
        unknown = sorted(k for k in keys if k.partition(SEPARATOR)[0] not in KINDS or SEPARATOR not in k)
        if unknown:
            raise MedmergeError(
                f"{tensors_path}: unknown tensor {unknown[0]!r} (expected <kind>::<weight name>, "
                f"kind one of {', '.join(KINDS)})"
            )
        return cls(folder, info, handle, keys)

    @property
    def info(self) -> dict[str, Any]:
        """The statistics.json record (format, examples, tokens, kinds, bytes, data, model, …)."""
        return self._info

    def has(self, kind: str) -> bool:
        """True where the file holds statistics of `kind` ("gram" or "fisher")."""
        return kind in self._info.get("kinds", ())

    def names(self, kind: str) -> list[str]:
        """Sorted weight names that have a `kind` statistic (Gram aliases included)."""
        prefix = tensor_key(kind, "")
        stored = {k[len(prefix) :] for k in self._keys if k.startswith(prefix)}
        if kind == "gram":
            stored |= {name for name, target in self._aliases.items() if target in stored}
        return sorted(stored)

    def read(self, kind: str, weight_name: str) -> torch.Tensor | None:
        """The float32 `kind` statistic of `weight_name` (an alias resolved), or None where there is none."""
        key = tensor_key(kind, weight_name)
        if key not in self._keys and kind == "gram":
            key = tensor_key(kind, self._aliases.get(weight_name, weight_name))
        if key not in self._keys:
            return None
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for a damaged body
            raise MedmergeError(f"{self.folder / TENSORS_FILE}: cannot read {key} ({exc})") from None

    def matches_model(self, folder: str | Path | None = None) -> bool:
        """True where the weights in `folder` (default: this one) are those the statistics were made of."""
        recorded = (self._info.get("model") or {}).get("checksum")
        return recorded is not None and recorded == expert_checksum(folder or self.folder)

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> SiteStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
