"""Writing a merged model's bytes: buffered (through the page cache) vs O_DIRECT (medmerge's DirectFile).

    .venv/bin/python bench/direct_write.py [--gb 1.45] [--repeats 3] [--settle 5] [--folder DIR]

Each run writes the same --gb of random bytes to a new file in --folder (default: a temporary folder on
the disk, not /tmp if that is a tmpfs) in 16 MiB pieces, as medmerge's ShardWriter does, and closes it.
Before each run, outside the timing, earlier files are deleted, dirty pages flushed (`os.sync`) and
--settle seconds pass: a VM with free page reporting hands freed memory back to its host about 2 s
after it is freed, and the next page-cache page then costs a host fault. Prints the best of --repeats
for each way and their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from medmerge.merge.direct_io import DirectFile

PIECE = 16 << 20


def write_once(path: Path, total: int, piece: bytes, direct: bool) -> tuple[float, bool]:
    """Seconds to write and close `total` bytes; whether O_DIRECT was used to the end."""
    start = time.perf_counter()
    with DirectFile(path, direct=direct) as f:
        done = 0
        while done < total:
            take = min(len(piece), total - done)
            f.write(memoryview(piece)[:take])
            done += take
    seconds = time.perf_counter() - start
    if path.stat().st_size != total:
        raise RuntimeError(f"{path}: {path.stat().st_size} bytes written, expected {total}")
    return seconds, f.direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--gb", type=float, default=1.45, help="bytes per file, in GB (default 1.45: a 360M fp32)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between flush and run (default 5)")
    parser.add_argument("--folder", type=Path, help="where to write (default: a temporary folder in the cwd)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="direct-write-", dir="."))
    total = int(args.gb * 1e9)
    piece = os.urandom(PIECE)
    best: dict[str, float] = {}
    used_direct = True
    for _ in range(args.repeats):
        for way in ("buffered", "direct"):
            for old in folder.glob("*.bin"):
                old.unlink()
            os.sync()
            time.sleep(args.settle)
            seconds, direct = write_once(folder / f"{way}.bin", total, piece, way == "direct")
            used_direct = used_direct and (direct or way == "buffered")
            best[way] = min(best.get(way, float("inf")), seconds)
            print(f"... {way}: {seconds:.2f} s", flush=True)
    for old in folder.glob("*.bin"):
        old.unlink()
    if args.folder is None:
        folder.rmdir()
    gb = total / 1e9
    print(f"\n{gb:.2f} GB, best of {args.repeats}, settle {args.settle:g} s, folder {folder}")
    print("| write | s | GB/s |\n|---|---|---|")
    for way, seconds in best.items():
        print(f"| {way} | {seconds:.2f} | {gb / seconds:.2f} |")
    note = "" if used_direct else " (the file system refused O_DIRECT: both ways were buffered)"
    print(f"direct / buffered: {best['direct'] / best['buffered']:.2f}×{note}")


if __name__ == "__main__":
    main()
