"""Memory slots: in local mode (`medmerge federate`, every site on one machine) only as many sites
train at once as the machine's memory holds.

    limit = max(1, ⌊budget / peak⌋)

`budget` (bytes): the memory psutil reports available when the study starts (the launcher writes it
into SLOTS/slots.json, after every site's worker has loaded). `peak` (bytes): the configured
`federation.training_memory_gb`, else the largest peak measured so far (each slot samples the memory
of the process holding it and its children, above what the process held when it took the slot, and
keeps the maximum in SLOTS/peaks/<site>.json); before any training has ended, the largest provisional
peak: a training's running peak after PROVISIONAL_AFTER_S seconds × PROVISIONAL_MARGIN
(SLOTS/provisional/<site>.json; a training allocates its weights, gradients, optimizer state and
activations in its first steps); before that, one training at a time.

A slot is an exclusive `fcntl.flock` on SLOTS/slot-<i>.lock, i < limit: the kernel releases it when
its holder exits, even by kill -9. A site that waits says so once in its own log, and names itself in
SLOTS/waiting/<site>.json, which `medmerge federate` prints on its progress line.

    configure(folder, site)             # once per worker process (worker --slots FOLDER)
    with training_slot("expert"):       # around each training / FedAvg round / statistics
        ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SLOTS_FILE = "slots.json"
PROVISIONAL_AFTER_S = 45.0  # seconds into a training after which its running peak stands in (module doc)
PROVISIONAL_MARGIN = 1.5  # × that running peak, until a training has ended and its peak is measured
_configured: dict[str, object] = {"folder": None, "site": "site", "provisional_after_s": PROVISIONAL_AFTER_S}


def configure(folder: str | Path | None, site: str, provisional_after_s: float = PROVISIONAL_AFTER_S) -> None:
    """Make `training_slot` of this process use `folder` (None: no bound) on behalf of `site`."""
    path = None if folder is None else Path(folder)
    _configured.update(folder=path, site=site, provisional_after_s=provisional_after_s)


def write_budget(folder: Path, budget_bytes: int, peak_bytes: int | None) -> None:
    """The launcher's part: the memory the trainings may share, and the configured peak (or None)."""
    from medmerge.manifest import write_json_atomic

    for sub in ("peaks", "provisional", "waiting"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / SLOTS_FILE, {"budget_bytes": int(budget_bytes), "peak_bytes": peak_bytes})


def limit(folder: Path) -> tuple[int, int, int | None]:
    """(how many may train at once, budget bytes, peak bytes or None)."""
    spec = json.loads((folder / SLOTS_FILE).read_text())
    peak = spec.get("peak_bytes")
    for sub in ("peaks", "provisional"):  # measured peaks first; provisional ones only before any
        if peak is None:
            peak = max(_peaks(folder / sub), default=None)
    budget = int(spec["budget_bytes"])
    return (1 if not peak else max(1, budget // int(peak))), budget, peak


def _peaks(folder: Path) -> list[int]:
    """The peak_bytes of the records in `folder`; one removed or replaced while read is skipped (a
    provisional record is deleted when its training's measured peak is written)."""
    found = []
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found.append(int(json.loads(path.read_text())["peak_bytes"]))
    return found


def waiting(folder: Path) -> dict[str, str]:
    """site → what it waits to train, for the sites waiting for memory now."""
    found = {}
    for path in sorted((folder / "waiting").glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            found[path.stem] = json.loads(path.read_text())["what"]
    return found


def _tree_rss(process: object) -> int:
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:  # type: ignore[attr-defined]
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class _PeakSampler:
    """Samples this process tree's RSS every `every` s; `peak`: the most above the RSS at the start.
    After `after` s it hands the running peak to `provisional` once (module doc)."""

    def __init__(
        self, every: float = 0.5, provisional: Callable[[int], None] | None = None, after: float = 0.0
    ) -> None:
        import psutil

        self.process, self.every, self.stop = psutil.Process(), every, threading.Event()
        self.provisional, self.after, self.began = provisional, after, time.monotonic()
        self.start = self.top = _tree_rss(self.process)
        self.thread = threading.Thread(target=self._run, daemon=True, name="slot-peak")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.top = max(self.top, _tree_rss(self.process))
            if self.provisional is not None and time.monotonic() - self.began >= self.after:
                with contextlib.suppress(OSError):  # a hint only: the measured peak follows
                    self.provisional(self.top - self.start)
                self.provisional = None

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        self.top = max(self.top, _tree_rss(self.process))
        return self.top - self.start


def _record_peak(folder: Path, site: str, peak: int) -> None:
    from medmerge.manifest import write_json_atomic

    path = folder / "peaks" / f"{site}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        peak = max(peak, int(json.loads(path.read_text())["peak_bytes"]))
    write_json_atomic(path, {"peak_bytes": peak})
    (folder / "provisional" / f"{site}.json").unlink(missing_ok=True)


def _record_provisional(folder: Path, site: str, running_peak: int) -> None:
    from medmerge.manifest import write_json_atomic

    if running_peak > 0 and not (folder / "peaks" / f"{site}.json").is_file():
        peak = int(running_peak * PROVISIONAL_MARGIN)
        (folder / "provisional").mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "provisional" / f"{site}.json", {"peak_bytes": peak})


def _try_slot(folder: Path, n: int) -> int | None:
    """An open descriptor holding one of slots 0..n-1, or None when all are held."""
    for i in range(n):
        fd = os.open(folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
    return None


@contextlib.contextmanager
def training_slot(
    what: str, folder: Path | None = None, site: str | None = None, poll_s: float = 1.0
) -> Iterator[None]:
    """Hold one training slot for the body (no bound without a folder: configure() or `folder`)."""
    folder = Path(folder) if folder is not None else _configured["folder"]  # type: ignore[assignment]
    site = site or str(_configured["site"])
    if folder is None:
        yield
        return
    told, notice = False, folder / "waiting" / f"{site}.json"
    while (fd := _try_slot(folder, (bound := limit(folder))[0])) is None:
        if not told:
            from medmerge.manifest import write_json_atomic

            n, budget, peak = bound
            per = f"{peak / 2**30:.1f} GiB per training" if peak else "per-training peak not yet measured"
            line = f"{n} training(s) at a time: {budget / 2**30:.1f} GiB available, {per}"
            print(f"{site}: {what} waits for memory ({line})", file=sys.stderr, flush=True)
            write_json_atomic(notice, {"what": what, "since": time.time()})
            told = True
        time.sleep(poll_s)
    notice.unlink(missing_ok=True)
    after = float(_configured["provisional_after_s"])  # type: ignore[arg-type]
    sampler = _PeakSampler(provisional=lambda peak: _record_provisional(folder, site, peak), after=after)
    try:
        yield
    finally:
        _record_peak(folder, site, sampler.close())
        os.close(fd)
