"""Every merge method beside the chosen one: the gap each closes, and each family against the data-free best.

For a method m and a domain d (in-domain test sets, out-of-domain sets), with the best expert chosen on
validation loss and the multi-task model trained on the pooled data:

    gap closed_d(m) = (L_d(expert) − L_d(m)) / (L_d(expert) − L_d(multitask))     (test loss, nats/token)

0 = no better than the best expert, 1 = as good as the multi-task model; None where the multi-task model
is not better than the expert on d (no gap to close). Families are the registry's (`MethodSpec.family`):
data-free weight arithmetic, spectral / LoRA-native, data-aware. Each non-data-free family's best merge
(lowest validation loss, as the verdict chooses) is tested against the best data-free merge, question by
question on each domain's sets (paired bootstrap of test loss: Δ < 0 means the family's merge is better).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from medmerge.evaluate.stats import PairedTest
from medmerge.merge import get_method

BASELINE_FAMILY = "data_free"


@dataclass(frozen=True)
class MethodGap:
    """One method's family, validation loss and gap closed per domain."""

    method: str
    family: str
    validation_loss: float | None
    gap_closed: dict[str, float | None]  # domain → share of the expert-to-multitask gap

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "family": self.family,
            "validation_loss": self.validation_loss,
            "gap_closed": self.gap_closed,
        }


@dataclass(frozen=True)
class FamilyTest:
    """A family's best merge against the best data-free merge: test loss of `method` − `versus`."""

    family: str
    method: str
    versus: str
    loss: dict[str, PairedTest | None]  # domain → paired test

    def to_json(self) -> dict[str, Any]:
        tests = {d: None if t is None else t.as_dict() for d, t in self.loss.items()}
        return {"family": self.family, "method": self.method, "versus": self.versus, "loss": tests}


def gap_closed(expert: float | None, multitask: float | None, model: float | None) -> float | None:
    """(expert − model) / (expert − multitask); None without a positive gap or a value."""
    if expert is None or multitask is None or model is None or not expert - multitask > 0:
        return None
    return (expert - model) / (expert - multitask)


def method_gaps(
    losses: Mapping[str, Mapping[str, float | None]],
    validation: Mapping[str, float | None],
    expert: str,
    domains: list[str],
) -> list[MethodGap]:
    """A `MethodGap` per method of `validation` (method → its validation loss), from test `losses`
    (model → domain → mean test loss; must hold `expert` and, for gaps, `multitask`)."""
    rows = []
    for method, loss in validation.items():
        multitask = losses.get("multitask", {})
        gaps = {
            d: gap_closed(losses[expert].get(d), multitask.get(d), losses[method].get(d)) for d in domains
        }
        rows.append(MethodGap(method, get_method(method).family, loss, gaps))
    return rows


def family_tests(
    validation: Mapping[str, float | None],
    compare: Callable[[str, str, str], PairedTest | None],
    domains: list[str],
) -> list[FamilyTest]:
    """Each family's best merge (lowest validation loss) against the data-free best, on every domain;
    `compare(a, b, domain)` is the paired test of test loss a − b. Empty without a data-free method."""
    best: dict[str, str] = {}
    for method, loss in validation.items():
        family = get_method(method).family
        if loss is not None and (family not in best or loss < validation[best[family]]):  # type: ignore[operator]
            best[family] = method
    if BASELINE_FAMILY not in best:
        return []
    versus = best[BASELINE_FAMILY]
    return [
        FamilyTest(family, method, versus, {d: compare(method, versus, d) for d in domains})
        for family, method in best.items()
        if family != BASELINE_FAMILY
    ]


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(gaps: list[MethodGap], domains: list[str]) -> str:
    """Method × (family, validation loss, gap closed per domain), best validation loss first."""
    head = ["method", "family", "val loss ↓"] + [f"{d} gap closed ↑" for d in domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(gaps, key=lambda g: float("inf") if g.validation_loss is None else g.validation_loss)
    for g in order:
        loss = "–" if g.validation_loss is None else f"{g.validation_loss:.3f}"
        cells = [g.method, g.family.replace("_", "-"), loss] + [_share(g.gap_closed.get(d)) for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_lines(tests: list[FamilyTest], describe: Callable[[PairedTest], str]) -> list[str]:
    """One plain sentence per family and domain: does its best merge beat the data-free best?"""
    lines = []
    for t in tests:
        for domain, test in t.loss.items():
            if test is None:
                continue
            family = t.family.replace("_", "-")
            lines.append(
                f"{domain}: the best {family} merge ({t.method}) against the best data-free merge "
                f"({t.versus}), both chosen on validation loss: test loss {describe(test)}."
            )
    return lines
