"""The `privacy` section of a training config: DP-SGD on the LoRA adapters (see medmerge.train.privacy)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medmerge.config.base import StrictModel


class PrivacySettings(StrictModel):
    """(ε, δ)-differential privacy of the training data, by DP-SGD (Opacus), per unit of privacy.

    The unit is one Q&A pair (`pair`) or one group of pairs (`group`: a MedQuAD focus topic with all
    its questions, or one value of a jsonl/csv `group` column with all its rows); `auto` takes `group`
    wherever the loader knows the pairs' groups. With N units in the training split: Poisson sampling of
    units at rate q = batch_size / N, each unit's (summed) gradient clipped to L2 norm ≤ max_grad_norm,
    Gaussian noise of standard deviation noise_multiplier · max_grad_norm added to their sum. Exactly
    one of target_epsilon (σ calibrated so the run's steps spend at most ε) and noise_multiplier
    (σ given, ε reported) is set. δ defaults to 1/(10·N); δ ≥ 1/N is refused.

    `budget` caps ε (at the site's δ) over everything the site releases, composed in its privacy
    ledger (medmerge.train.ledger): a release that would pass it is refused before it runs.
    """

    target_epsilon: float | None = Field(default=None, gt=0, description="ε budget of this run")
    noise_multiplier: float | None = Field(
        default=None, gt=0, description="σ: noise std / max_grad_norm (instead of target_epsilon)"
    )
    delta: float | None = Field(
        default=None, gt=0, lt=1, description="δ; default 1/(10·N), N = training units; must be < 1/N"
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-unit L2 clipping bound C")
    accountant: Literal["prv", "rdp"] = Field(
        default="prv", description="Opacus accountant: prv (tight, numerical) or rdp (Rényi DP bound)"
    )
    unit: Literal["auto", "pair", "group"] = Field(
        default="auto",
        description=(
            "unit of privacy: pair (one Q&A pair), group (a MedQuAD focus topic / a jsonl-csv `group` "
            "value, with all its pairs); auto = group wherever the data has groups, else pair"
        ),
    )
    budget: float | None = Field(
        default=None,
        gt=0,
        description="cap on the site's composed ε over all its DP releases (privacy ledger); None = no cap",
    )

    @model_validator(mode="after")
    def _one_of(self) -> PrivacySettings:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of target_epsilon and noise_multiplier")
        return self
