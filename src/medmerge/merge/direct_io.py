"""A write-only file that bypasses the page cache (O_DIRECT), for merged weights.

A buffered write of a merged model puts every byte in a fresh page-cache page first. On a virtual
machine whose freed memory goes back to the host (virtio-balloon free page reporting), each fresh page
then costs a fault in the host as well: writing 1.45 GB (a 360M model in float32) took 3.10 s buffered
and 0.73 s with O_DIRECT on the 2-core VM that medmerge's benchmarks run on (`bench/direct_write.py`,
best of 2). O_DIRECT also leaves the page cache to the inputs instead of filling it with dirty output
pages. The cost: the write waits for the device (about 2 GB/s there), where a buffered one returns once
the bytes are in memory and leaves the device's work for later.

Bytes are staged in one page-aligned buffer (O_DIRECT needs aligned memory, offsets and lengths) and
written in whole buffers; `close` pads the last block and truncates the file to its true length. Where
the file system refuses O_DIRECT (tmpfs, some network or FUSE file systems: EINVAL) the file continues
as an ordinary buffered one. `MEDMERGE_DIRECT_IO=0` always writes buffered.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

STAGING_BYTES = 16 << 20  # one write to the device per 16 MiB (a multiple of every logical block size)
BLOCK = 4096  # O_DIRECT alignment of lengths and offsets (the largest usual logical block size)


def direct_io_enabled() -> bool:
    """True unless MEDMERGE_DIRECT_IO is 0 / false / no / off, or the platform has no O_DIRECT."""
    setting = os.environ.get("MEDMERGE_DIRECT_IO", "1").strip().lower()
    return hasattr(os, "O_DIRECT") and setting not in {"0", "false", "no", "off"}


class DirectFile:
    """Append-only binary file written with O_DIRECT when the file system allows it.

    `write(data)` appends any bytes-like object; `close()` flushes and sets the file to the number of
    bytes written. `direct` says whether O_DIRECT is (still) in use.
    """

    def __init__(self, path: str | Path, direct: bool | None = None) -> None:
        self.path = Path(path)
        self.direct = direct_io_enabled() if direct is None else direct and hasattr(os, "O_DIRECT")
        self._fd = -1
        if self.direct:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if not self.direct:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._buffer = mmap.mmap(-1, STAGING_BYTES) if self.direct else None  # page-aligned
        self._staged = 0  # bytes in the buffer, not yet written
        self._written = 0  # bytes on disk (a multiple of STAGING_BYTES while direct)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view) and self.direct:  # stage; a flush may fall back to buffered
            take = min(len(view) - done, STAGING_BYTES - self._staged)
            self._buffer[self._staged : self._staged + take] = view[done : done + take]
            self._staged += take
            done += take
            if self._staged == STAGING_BYTES:
                self._flush(STAGING_BYTES)
        if done < len(view):
            self._write_all(view[done:])

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self.direct and self._staged:
                length = self._written + self._staged
                self._flush(-(-self._staged // BLOCK) * BLOCK)  # whole blocks; the tail is cut below
                if self.direct:
                    os.ftruncate(self._fd, length)
        finally:
            os.close(self._fd)
            self._fd = -1
            if self._buffer is not None:
                self._buffer.close()
                self._buffer = None

    def __del__(self) -> None:  # a writer abandoned by an error: release the descriptor, flush nothing
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _flush(self, length: int) -> None:
        """Write the first `length` bytes of the buffer (whole blocks); on EINVAL, go on buffered."""
        staged = memoryview(self._buffer)[:length]
        try:
            self._write_all(staged)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._go_buffered()
            self._write_all(staged[: self._staged])
        else:
            self._written += min(length, self._staged)
        finally:
            staged.release()
        self._staged = 0

    def _go_buffered(self) -> None:
        """The file system accepted O_DIRECT at open but refuses its writes: reopen without it."""
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        os.ftruncate(self._fd, self._written)
        os.lseek(self._fd, self._written, os.SEEK_SET)
        self.direct = False

    def _write_all(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
