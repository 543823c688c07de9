"""`medmerge federate` configs. One YAML describes the study; each party reads its part:
the coordinator never reads a site's `data`, a site reads only its own (local mode writes each party
its own copy: the coordinator's has no SPEC at all)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medmerge.config import (
    DataConfig,
    EvaluateSettings,
    SearchSettings,
    SplitSettings,
    StrictModel,
    ThreadsSetting,
    TrainConfig,
    TrainSettings,
    normalised_specs,
)
from medmerge.config.experiment import _every_method


class SiteSpec(StrictModel):
    """A site: its name and (only in the site's own copy) the dataset SPECs it trains and tests on."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: list[str] = Field(default_factory=list)

    @field_validator("data")
    @classmethod
    def _specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)


class FedAvgSettings(StrictModel):
    """The multi-round FedAvg-of-LoRA baseline (federated/fedavg.py), reported beside one-shot merging."""

    rounds: int = Field(0, ge=0, description="FedAvg rounds; 0 = no FedAvg baseline")
    local_steps: int = Field(10, ge=1, description="optimizer steps each site trains per round")


class FederationSettings(StrictModel):
    objective: Literal["tokens", "sites", "worst_site"] = Field(
        "tokens", description="search objective: token-weighted mean, mean over sites, or worst site"
    )
    per_question: bool = Field(False, description="sites may send per-question test losses (bootstrap)")
    reply_timeout_s: float = Field(900, gt=0, description="a site silent this long is dropped")
    min_sites: int = Field(2, ge=1, description="fewest sites the study may finish with")
    fedavg: FedAvgSettings = FedAvgSettings()


class FederatedConfig(SplitSettings, ThreadsSetting):
    base_model: str = "smollm2-135m"
    sites: list[SiteSpec] = Field(min_length=2)
    train_examples: int | None = Field(default=None, ge=1)
    train: TrainSettings = Field(default_factory=TrainSettings)
    methods: list[str] = Field(default_factory=_every_method)
    search: SearchSettings = SearchSettings()
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    federation: FederationSettings = FederationSettings()

    @field_validator("sites")
    @classmethod
    def _distinct(cls, sites: list[SiteSpec]) -> list[SiteSpec]:
        names = [s.name for s in sites]
        if len(set(names)) != len(names) or {"base", "fedavg"} & set(names):
            raise ValueError(f"site names must be unique and not 'base' or 'fedavg', got {names}")
        return sites

    def site(self, name: str) -> SiteSpec:
        return next(s for s in self.sites if s.name == name)

    def for_party(self, site: str | None) -> FederatedConfig:
        """The copy a party reads: a site keeps only its own SPECs, the coordinator (None) none."""
        sites = [s.model_copy(update={"data": s.data if s.name == site else []}) for s in self.sites]
        return self.model_copy(update={"sites": sites})

    def train_config(self, specs: list[str]) -> TrainConfig:
        data = DataConfig(specs=specs, **self.split_settings().model_dump(), max_examples=self.train_examples)
        return TrainConfig.model_validate({**self.train.model_dump(), "model": self.base_model, "data": data})
