"""The `privacy` section of a training config: DP-SGD on the LoRA adapters (see medmerge.train.privacy)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medmerge.config.base import StrictModel


class PrivacySettings(StrictModel):
    """(ε, δ)-differential privacy of the training pairs, by DP-SGD (Opacus): Poisson sampling at rate
    q = batch_size / n, per-example gradients clipped to L2 norm ≤ max_grad_norm, Gaussian noise of
    standard deviation noise_multiplier · max_grad_norm added to their sum. Exactly one of
    target_epsilon (σ calibrated so the run's steps spend at most ε) and noise_multiplier (σ given,
    ε reported) is set.
    """

    target_epsilon: float | None = Field(default=None, gt=0, description="ε budget of the whole run")
    noise_multiplier: float | None = Field(
        default=None, gt=0, description="σ: noise std / max_grad_norm (instead of target_epsilon)"
    )
    delta: float | None = Field(
        default=None, gt=0, lt=1, description="δ; default 1/n, n = the site's training pairs"
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-example L2 clipping bound C")
    accountant: Literal["prv", "rdp"] = Field(
        default="prv", description="Opacus accountant: prv (tight, numerical) or rdp (Rényi DP bound)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> PrivacySettings:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of target_epsilon and noise_multiplier")
        return self
