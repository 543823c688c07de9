"""What `medmerge run` shows while it works: which step runs, how long it took, how many remain."""

from __future__ import annotations

import sys
import time

from medmerge.config import ExperimentConfig
from medmerge.merge import get_method


class Progress:
    """Step lines on stderr: `[run 4/31 · 2m13s] searching ties (8 trials, tpe)`."""

    def __init__(self, config: ExperimentConfig, enabled: bool = True) -> None:
        experts = len(config.experts) + int(config.multitask)
        methods = len(config.methods)
        statistics = len(config.experts) if any(get_method(m).needs_statistics for m in config.methods) else 0
        # + validation, evaluation, verdict
        self.total = experts + statistics + methods + methods * len(config.spaces) + 3
        self.enabled = enabled
        self.step = 0
        self.started = time.perf_counter()
        self._step_started = self.started

    def _line(self, text: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            print(
                f"[run {self.step}/{self.total} · {int(elapsed // 60)}m{int(elapsed % 60):02d}s] {text}",
                file=sys.stderr,
                flush=True,
            )

    def start(self, text: str) -> None:
        self.step += 1
        self._step_started = time.perf_counter()
        self._line(f"{text} … ({self.total - self.step} steps after this)")

    def skip(self, text: str) -> None:
        self.step += 1
        self._line(f"{text}: cached, skipped")

    def note(self, text: str) -> None:
        """A line that is no step of its own (e.g. why a method is left out)."""
        self._line(text)

    def done(self, text: str) -> None:
        self._line(f"{text} done in {time.perf_counter() - self._step_started:.1f}s")
