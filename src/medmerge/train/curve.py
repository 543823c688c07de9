"""The training curve: one CSV row per optimizer step, and a PNG of train and validation loss."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

COLUMNS = ("step", "epoch", "lr", "train_loss", "val_loss", "tokens", "elapsed_s")


def write_curve_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows with the COLUMNS keys (missing values written empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train loss per step and validation loss at each evaluation (nats per answer token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        return [p[0] for p in points], [p[1] for p in points]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("train_loss"), label="train (per step)", linewidth=0.8, alpha=0.7)
    ax.plot(*series("val_loss"), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer NLL (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
