"""DirectFile: O_DIRECT output with a staging buffer, its padding cut off, and its buffered fallbacks."""

from __future__ import annotations

import errno
import os
import random

import pytest

from medmerge.merge import direct_io
from medmerge.merge.direct_io import DirectFile

SIZES = [1, 5000, 3 * 4096, 30000, 7, 0, 4096, 12289]  # across block and buffer boundaries


def _chunks(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in SIZES]


def _supports_o_direct(folder) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("direct", [True, False])
def test_the_file_holds_exactly_the_bytes_written(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(direct_io, "STAGING_BYTES", 3 * 4096)  # several buffer flushes
    chunks = _chunks(1)
    with DirectFile(tmp_path / "out.bin", direct=direct) as f:
        for chunk in chunks:
            f.write(chunk)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(chunks)


def test_it_writes_past_the_page_cache_where_the_file_system_allows(tmp_path):
    if not _supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    f = DirectFile(tmp_path / "out.bin", direct=True)
    flags = int(open(f"/proc/self/fdinfo/{f._fd}").read().split("flags:")[1].split()[0], 8)
    f.write(b"x" * 10)
    f.close()
    assert f.direct and flags & os.O_DIRECT
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 10


def test_writes_refused_after_open_go_on_buffered(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the writes (EINVAL): the bytes already on
    disk stay, the refused block is written again buffered, and so is everything after it."""
    if not _supports_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT")
    monkeypatch.setattr(direct_io, "STAGING_BYTES", 2 * 4096)
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # the first two buffers land, the third is refused
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", write)
    chunks = _chunks(2)
    f = DirectFile(tmp_path / "out.bin", direct=True)
    for chunk in chunks:
        f.write(chunk)
    f.close()
    assert not f.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(chunks)


def test_a_file_system_that_refuses_o_direct_at_open_gets_a_buffered_file(tmp_path, monkeypatch):
    real_open = os.open

    def open_(path, flags, *mode):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *mode)

    monkeypatch.setattr(direct_io.os, "open", open_)
    f = DirectFile(tmp_path / "out.bin", direct=True)
    f.write(b"abc")
    f.close()
    assert not f.direct and (tmp_path / "out.bin").read_bytes() == b"abc"


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("1", True), (None, True)])
def test_medmerge_direct_io_turns_it_off(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("MEDMERGE_DIRECT_IO", raising=False)
    else:
        monkeypatch.setenv("MEDMERGE_DIRECT_IO", value)
    assert direct_io.direct_io_enabled() is (expected and hasattr(os, "O_DIRECT"))


def test_other_errors_are_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        DirectFile(tmp_path / "missing" / "out.bin", direct=True)
