"""torch's CPU threads, set once per command at its entry (library steps never change them).

On a CPU that other work shares, torch's OpenMP threads spin-wait for each other: fewer threads than
cores avoids it (docs/architecture.md, "Threads").
"""

from __future__ import annotations


def use_threads(threads: int | None) -> None:
    """Run torch's CPU ops of this process on `threads` threads (None: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
