"""`medmerge federate` configs. One YAML describes the study; each party reads its part:
the coordinator never reads a site's `data` or `ood`, a site reads only its own (local mode writes each
party its own copy: the coordinator's has no SPEC at all).

A site is an `expert` (it trains on `data`, scores the search on its validation split, evaluates its test
split) or an `evaluate`-only node (no training data: it evaluates every model on its `ood` sets). Either
kind may hold out-of-domain sets (`ood`: scored whole, as `medmerge evaluate --ood`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medmerge.config import (
    DataConfig,
    EvaluateConfig,
    EvaluateSettings,
    SearchSettings,
    SplitSettings,
    StrictModel,
    ThreadsSetting,
    TrainConfig,
    TrainSettings,
    normalised_specs,
)
from medmerge.config.experiment import StatisticsSettings, every_method


class SiteSpec(StrictModel):
    """A site: its name, its role and (only in the site's own copy) the dataset SPECs it holds."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)  # no dot: never `..` in a path
    role: Literal["expert", "evaluate"] = Field(
        "expert", description="expert: trains, scores the search, evaluates; evaluate: evaluates only"
    )
    data: list[str] = Field(default_factory=list, description="SPECs it trains, validates and tests on")
    ood: list[str] = Field(default_factory=list, description="out-of-domain SPECs it evaluates (whole)")
    node_id: int | None = Field(
        default=None,
        ge=0,
        description="(coordinator's copy) the node id Flower gave the public key registered for this "
        "site (`flwr supernode register` prints it): only that node's replies are this site's",
    )

    @field_validator("data", "ood")
    @classmethod
    def _specs(cls, specs: list[str]) -> list[str]:
        return normalised_specs(specs)

    @model_validator(mode="after")
    def _evaluators_hold_no_training_data(self) -> SiteSpec:
        if self.role == "evaluate" and self.data:
            raise ValueError(f"site {self.name}: an evaluate-only node has no `data` (give `ood` SPECs)")
        return self


class FederatedEvaluateSettings(EvaluateSettings):
    """`evaluate` of a federated study: as `medmerge run`'s, but out-of-domain sets live at the sites
    (`sites[].ood`), and generation (ROUGE, BLEU, chrF, BERTScore at each site) is off unless asked."""

    generate: bool = Field(default=False, description="generate answers at each site (text metrics)")

    @field_validator("ood")
    @classmethod
    def _ood_lives_at_a_site(cls, specs: list[str]) -> list[str]:
        if specs:
            raise ValueError(
                "a federated study has no global out-of-domain set: give it to the site or evaluate-only "
                "node that holds it (sites: [{name: ..., role: evaluate, ood: [...]}])"
            )
        return specs


class FedAvgSettings(StrictModel):
    """The multi-round FedAvg-of-LoRA baseline (federated/fedavg.py), reported beside one-shot merging,
    and how the coordinator combines the sites' updates each round (fedavg.AggregateOptions)."""

    rounds: int = Field(0, ge=0, description="FedAvg rounds; 0 = no FedAvg baseline")
    local_steps: int = Field(10, ge=1, description="optimizer steps each site trains per round")
    aggregate: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean",
        description="mean: the exact pair-weighted mean of the updates ΔW_i; median: the coordinate-wise "
        "median (Flower's FedMedian, unweighted); trimmed_mean: per coordinate, ⌊trim·n⌋ values cut from "
        "each end, the rest averaged (Flower's FedTrimmedAvg, unweighted)",
    )
    trim: float = Field(
        0.2, ge=0.0, lt=0.5, allow_inf_nan=False, description="trimmed_mean: the share cut from each end"
    )
    clip_norm: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="each site's whole update ΔW_i scaled by min(1, clip_norm / ‖ΔW_i‖_F) before it is "
        "combined (Flower's fixed clipping, no noise); None: no clipping",
    )


class RobustSettings(StrictModel):
    """The coordinator's screen of what the sites contribute, before anything is merged or forwarded
    (federated/robust.py, federated/screening.py)."""

    norm_k: float = Field(
        3.0,
        ge=1.0,
        allow_inf_nan=False,
        description="a module's ‖ΔW‖_F above norm_k × the sites' median (the other site's, with two) is "
        "an outlier: an outsized site is scaled back to the others' size, a module still above is "
        "clipped to the median",
    )
    refuse_share: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="refuse a site outright (rather than scale it back) when more than this share of "
        "its modules are outliers; None: never refused for its norms",
    )
    direction_threshold: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="a site whose update's median cosine with more than half of the other sites' is "
        "below this is refused (≥ 3 expert sites; a sign-flipped update)",
    )
    gram_k: float = Field(
        4.0,
        gt=1.0,
        allow_inf_nan=False,
        description="a site whose Gram trace per declared token lies outside [1/gram_k, gram_k] × the "
        "sites' median is refused (≥ 3 sites sharing statistics)",
    )


class QueryBudget(StrictModel):
    """How many queries a site answers over its folder's lifetime (across runs and restarts; the counts
    are kept in the site's budget.json). Each site reads its own copy: a request beyond it is refused
    (code over_budget), the reason logged at the site. None: derived from the study (`query_budget`)."""

    score: int | None = Field(
        None,
        ge=0,
        description="score requests (one merge scored on its validation split each); default 2 × "
        "search.trials × methods × (expert sites, with leave_one_out; else 1)",
    )
    evaluate: int | None = Field(
        None,
        ge=0,
        description="models evaluated (each model of each evaluate request); default 2 × (base + "
        "sites + methods + fedavg, + methods again with leave_one_out)",
    )


class FederatedStatisticsSettings(StatisticsSettings):
    """How the sites' statistics reach the coordinator (`mode`), and how they are computed.

    - plain: each site shares its statistics files (with `share_statistics: true`): the coordinator and
      every peer see each site's Grams (which give away its bag of tokens: docs/privacy.md).
    - secure: the coordinator learns only sums over ≥ 3 sites (SecAgg+, docs/secure-aggregation.md),
      for fixed expert weights (all 1): RegMean's α is searched, not the weights.
    - secure+dp: the sums carry distributed Gaussian noise (σ·C) over clipped statistics, each round
      charged to every site's privacy ledger; the expert weights are searched too, one round per trial.
    """

    mode: Literal["plain", "secure", "secure+dp"] = Field(
        "plain", description="plain (each site's statistics shared), secure (sums only), secure+dp"
    )
    clip: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="secure+dp: C, the bound on one unit's share of a release",
    )
    sigma: float = Field(
        4.0, gt=0, allow_inf_nan=False, description="secure+dp: noise multiplier of each sum"
    )
    unit: Literal["pair", "group"] = Field("pair", description="secure+dp: the unit one clip protects")
    delta: float | None = Field(
        None, gt=0, lt=1, description="secure+dp: the ledger's δ where it has none yet (default 1/(10·pairs))"
    )
    max_sums: int = Field(64, ge=1, description="secure sums a site joins over its folder's lifetime")

    @model_validator(mode="after")
    def _clip_for_dp(self) -> FederatedStatisticsSettings:
        if self.mode == "secure+dp" and self.clip is None:
            raise ValueError("statistics.mode secure+dp needs statistics.clip (C)")
        return self


class FederationSettings(StrictModel):
    objective: Literal["tokens", "sites", "worst_site"] = Field(
        "tokens", description="search objective: token-weighted mean, mean over sites, or worst site"
    )
    per_question: bool = Field(
        False,
        description="sites may send per-question test losses (bootstrap); never per-question generation "
        "metrics or accuracy, which would probe the reference answers",
    )
    weight_cap: float = Field(
        2.0,
        ge=1.0,
        allow_inf_nan=False,
        description="each site's self-reported weight (its validation tokens in the `tokens` objective, "
        "its training pairs in FedAvg) is clipped to at most weight_cap × the median of the sites' "
        "values, so no one site's numbers steer the objective or the average",
    )
    budget: QueryBudget = Field(default_factory=QueryBudget, description="this site's query budget")
    reply_timeout_s: float = Field(900, gt=0, description="a site silent this long is dropped")
    min_sites: int = Field(2, ge=1, description="fewest expert sites the study may finish with")
    leave_one_out: bool = Field(
        False,
        description="leave-one-site-out: for each expert site, search and merge the others' adapters on "
        "the others' validation splits, and score that merge on the held-out site's test split",
    )
    fedavg: FedAvgSettings = FedAvgSettings()
    robust: RobustSettings = Field(
        default_factory=RobustSettings, description="the screen of the sites' adapters and statistics"
    )
    share_statistics: bool = Field(
        False,
        description="expert sites compute site statistics (RegMean's Gram matrices, Fisher merging's "
        "diagonal Fisher) on their own training questions and share them with every party beside their "
        "adapter. Numbers only (no text, token ids or data paths), but they describe the site's data: "
        "assume the first layer's Gram reveals which tokens its questions and answers hold and how often, "
        "and DP does not cover them (docs/privacy.md#what-site-statistics-reveal, "
        "docs/site-statistics.md). Off: methods that need statistics are left out of the search",
    )
    statistics: FederatedStatisticsSettings = Field(
        default_factory=FederatedStatisticsSettings,
        description="how the statistics reach the coordinator (mode) and how they are computed",
    )
    training_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="local mode (`medmerge federate`): the peak memory one site's training takes; sites "
        "train at once only as many as the memory available at the start holds. Unset: measured at "
        "the first training (until then a running training's peak after 45 s, × 1.5; before that one at "
        "a time)",
    )

    @model_validator(mode="after")
    def _one_way_to_share(self) -> FederationSettings:
        if self.share_statistics and self.statistics.mode != "plain":
            raise ValueError(
                f"statistics.mode {self.statistics.mode} shares sums only: set share_statistics: false "
                "(sharing each site's plain statistics would undo it)"
            )
        return self


class FederatedConfig(SplitSettings, ThreadsSetting):
    base_model: str = "smollm2-135m"
    sites: list[SiteSpec] = Field(min_length=2)
    train_examples: int | None = Field(default=None, ge=1)
    train: TrainSettings = Field(default_factory=TrainSettings)
    methods: list[str] = Field(default_factory=every_method)
    search: SearchSettings = SearchSettings()
    evaluate: FederatedEvaluateSettings = Field(default_factory=FederatedEvaluateSettings)
    federation: FederationSettings = FederationSettings()
    isolate_steps: bool = Field(
        default=True,
        description="each site trains (experts, FedAvg rounds) and computes statistics in a child process,"
        " so its resident worker gives that memory back (off: in the worker)",
    )

    @field_validator("sites")
    @classmethod
    def _distinct(cls, sites: list[SiteSpec]) -> list[SiteSpec]:
        names = [s.name for s in sites]
        if len(set(names)) != len(names) or {"base", "fedavg"} & set(names):
            raise ValueError(f"site names must be unique and not 'base' or 'fedavg', got {names}")
        if sum(s.role == "expert" for s in sites) < 2:
            raise ValueError(f"a federated study needs at least 2 expert sites, got {names}")
        return sites

    def query_budget(self) -> dict[str, int]:
        """{kind: queries a site answers}: `federation.budget`, where unset derived from the study with
        a factor 2 of slack (a resumed study sends the trial in flight again; see QueryBudget)."""
        experts = sum(s.role == "expert" for s in self.sites)
        loo = self.federation.leave_one_out
        methods, rounds = len(self.methods), 1 if self.federation.fedavg.rounds else 0
        derived = {
            "score": 2 * self.search.trials * methods * (experts if loo else 1),
            "evaluate": 2 * (1 + len(self.sites) + methods + rounds + (methods if loo else 0)),
        }
        budget = self.federation.budget
        return {k: v if getattr(budget, k) is None else getattr(budget, k) for k, v in derived.items()}

    def site(self, name: str) -> SiteSpec:
        return next(s for s in self.sites if s.name == name)

    @property
    def evaluators(self) -> list[str]:
        """The evaluate-only nodes."""
        return [s.name for s in self.sites if s.role == "evaluate"]

    def for_party(self, site: str | None) -> FederatedConfig:
        """The copy a party reads: a site keeps only its own SPECs, the coordinator (None) none."""
        sites = [s if s.name == site else s.model_copy(update={"data": [], "ood": []}) for s in self.sites]
        return self.model_copy(update={"sites": sites})

    def evaluate_config(self, name: str) -> EvaluateConfig:
        """Site `name`'s evaluation (from its own copy): its test split in domain, its `ood` sets whole."""
        site = self.site(name)
        settings = self.split_settings().model_dump() | self.evaluate.model_dump(exclude_unset=True)
        settings |= {"generate": self.evaluate.generate, "data": site.data, "ood": site.ood}
        return EvaluateConfig.model_validate(settings)

    def train_config(self, specs: list[str]) -> TrainConfig:
        data = DataConfig(specs=specs, **self.split_settings().model_dump(), max_examples=self.train_examples)
        return TrainConfig.model_validate({**self.train.model_dump(), "model": self.base_model, "data": data})
