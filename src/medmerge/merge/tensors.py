"""Safetensors streaming: read one tensor at a time, write shards whose header is known first.

Reading maps just one tensor's bytes, privately (copy-on-write): the tensor is the page cache itself, so
nothing is copied or zero-filled, a write to it stays in this process, and the mapping goes away with
the tensor. Only the tensors alive at that moment count towards the resident memory, as with a copy; a
whole-file memory map would keep every page read so far. Writing precomputes every shard's header from
the planned (name, dtype, shape) list, then appends each tensor's bytes as soon as it is merged —
nothing waits in memory for a shard to fill.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medmerge.errors import MedmergeError
from medmerge.merge.direct_io import DirectFile
from medmerge.site_stats import STATISTICS_FILES  # site statistics beside the weights

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors described by a safetensors file's header, and its `__metadata__`."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedmergeError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", {}) or {}
    infos = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise MedmergeError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(
            name, DTYPES[entry["dtype"]], tuple(entry["shape"]), path, 8 + size + begin, end - begin
        )
    return infos, metadata


def read_tensor(info: TensorInfo, copy: bool = False) -> torch.Tensor:
    """One tensor, backed by a private copy-on-write map of its bytes in `info.file` (no copy on read).

    Writing to the tensor changes only this process's pages, never the file, but each page then faults
    and is copied on its own: a caller that computes in the tensor's storage asks for `copy` (one pread
    into new memory). The file must not be truncated while a mapped tensor lives (the usual rule of
    memory-mapped weights: safetensors, PyTorch). Data not aligned to its element size (no standard
    writer produces it) is read with pread too.
    """
    itemsize = info.dtype.itemsize
    if copy or info.nbytes == 0 or info.offset % itemsize:
        return _pread_tensor(info)
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
    with open(info.file, "rb") as f:
        if os.fstat(f.fileno()).st_size < info.offset + info.nbytes:
            raise MedmergeError(f"{info.file}: truncated data for tensor {info.name}")
        window = mmap.mmap(
            f.fileno(), info.offset + info.nbytes - start, access=mmap.ACCESS_COPY, offset=start
        )
    flat = torch.frombuffer(
        window, dtype=info.dtype, count=info.nbytes // itemsize, offset=info.offset - start
    )
    return flat.view(info.shape)


def _pread_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor with pread."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes == 0:
        return out
    buffer = out.reshape(-1).view(torch.uint8).numpy()
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            got = os.preadv(fd, [memoryview(buffer)[done:]], info.offset + done)
            if got <= 0:
                raise MedmergeError(f"{info.file}: truncated data for tensor {info.name}")
            done += got
    finally:
        os.close(fd)
    return out


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a model folder (sharded via its index, or every *.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(
        p
        for p in folder.glob("*.safetensors")
        if not p.name.startswith("adapter_model") and p.name not in STATISTICS_FILES
    )
    if not files:
        raise MedmergeError(f"{folder}: no .safetensors weights (medmerge reads safetensors only)")
    return files


def folder_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder, in file then offset order."""
    infos: dict[str, TensorInfo] = {}
    for file in weight_files(folder):
        found, _ = read_header(file)
        for name, info in sorted(found.items(), key=lambda kv: kv[1].offset):
            if name in infos:
                raise MedmergeError(f"{folder}: tensor {name} appears in two weight files")
            infos[name] = info
    return infos


def _header_bytes(entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


class ShardWriter:
    """Write planned tensors, in plan order, into shards of at most `max_shard_bytes` (one tensor may exceed).

    One shard → `model.safetensors`; several → `model-0000i-of-0000N.safetensors` plus
    `model.safetensors.index.json`. Each tensor is written as soon as `write` is called, past the page
    cache where the file system allows it (medmerge.merge.direct_io).
    """

    def __init__(
        self,
        folder: Path,
        plan: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        prefix: str = "model",
    ):
        self.folder = folder
        self.plan = list(plan)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in self.plan:
            nbytes = torch.Size(entry[2]).numel() * torch.empty((), dtype=entry[1]).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.names = (
            [f"{prefix}.safetensors"]
            if n == 1
            else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.total_bytes = 0
        self._order = [(s, e) for s, shard in enumerate(shards) for e in shard]
        self._next = 0
        self._file = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, (planned, dtype, shape) = self._order[self._next]
        if name != planned or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"ShardWriter: got {name} {tensor.dtype} {tuple(tensor.shape)}, planned {planned}"
            )
        if shard != self._shard:
            self._open(shard)
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.total_bytes += data.nbytes
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = shard
        header, _ = _header_bytes(self.shards[shard])
        self._file = DirectFile(self.folder / self.names[shard])  # closed in _open / close
        self._file.write(header)

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(
                f"ShardWriter: {len(self._order) - self._next} planned tensors were not written"
            )
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            weight_map = {name: self.names[s] for s, shard in enumerate(self.shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / f"{self.names[0].split('-')[0]}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )
