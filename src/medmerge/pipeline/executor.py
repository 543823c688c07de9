"""Where trials and evaluations run: in this process, or fanned out over a Ray cluster.

Ray stays optional: `RayExecutor` imports it only when asked (`medmerge run --ray ADDRESS`, or `--ray
auto` to start a local Ray), and workers must see the same file paths (a shared file system).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from medmerge.errors import MedmergeError


class Executor:
    """Runs `fn(*args)` for each argument tuple, in order; `parallelism` trials are asked at once."""

    parallelism = 1

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        return [fn(*args) for args in calls]

    def close(self) -> None:
        pass


class RayExecutor(Executor):
    """Each call is a Ray task (1 CPU); results come back in order."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise MedmergeError(
                "--ray: the `ray` package is not installed (pip install 'ray[default]')"
            ) from None
        self._ray = ray
        ray.init(
            address=None if address == "auto-local" else address,
            ignore_reinit_error=True,
            log_to_driver=False,
        )
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        remote = self._ray.remote(num_cpus=1)(fn)
        return self._ray.get([remote.remote(*args) for args in calls])

    def close(self) -> None:
        self._ray.shutdown()


def make_executor(ray_address: str | None) -> Executor:
    """Local unless `ray_address` is given ("auto-local" starts a local Ray)."""
    return RayExecutor(ray_address) if ray_address else Executor()
