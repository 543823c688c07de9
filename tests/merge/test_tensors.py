"""Streaming safetensors I/O: mapped and pread reads, and precomputed-header shard writes, match the
safetensors lib."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmerge.errors import MedmergeError
from medmerge.merge.tensors import ShardWriter, folder_tensors, read_header, read_tensor


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(3, 3, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(2.5),
        "f.mask": torch.tensor([True, False, True]),
    }


def test_read_matches_safetensors(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    infos, metadata = read_header(tmp_path / "model.safetensors")
    assert set(infos) == set(tensors)
    for name, tensor in tensors.items():
        for copy in (False, True):
            got = read_tensor(infos[name], copy)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)


def test_a_write_to_a_mapped_tensor_stays_in_this_process(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    infos, _ = read_header(path)
    mapped = read_tensor(infos["a.weight"])
    mapped.add_(1.0)
    assert torch.equal(read_tensor(infos["a.weight"]) + 1.0, mapped)
    del mapped
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    infos, _ = read_header(path)
    with open(path, "r+b") as f:
        f.truncate(infos["a.weight"].offset + 4)
    for copy in (False, True):
        with pytest.raises(MedmergeError, match="truncated data for tensor a.weight"):
            read_tensor(infos["a.weight"], copy)


@pytest.mark.parametrize("max_bytes", [1 << 30, 100])
def test_shard_writer_roundtrip(tmp_path, max_bytes):
    tensors = _tensors()
    writer = ShardWriter(tmp_path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], max_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    if max_bytes > 1000:
        assert writer.names == ["model.safetensors"]
        loaded = load_file(tmp_path / "model.safetensors")
    else:
        assert len(writer.names) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        loaded = {}
        for shard in writer.names:
            loaded.update(load_file(tmp_path / shard))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    assert {n: read_tensor(i) for n, i in folder_tensors(tmp_path).items()}.keys() == tensors.keys()


def test_shard_writer_refuses_unplanned_tensors(tmp_path):
    writer = ShardWriter(tmp_path, [("x", torch.float32, (2,))], 1 << 20)
    with pytest.raises(RuntimeError, match="planned x"):
        writer.write("x", torch.zeros(3))


def test_folder_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(MedmergeError, match="no .safetensors weights"):
        folder_tensors(tmp_path)
