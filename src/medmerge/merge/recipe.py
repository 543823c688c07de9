"""A merge recipe: which experts to merge, by which method, with which parameters and weights.

One `Recipe` is what a merge search proposes and scores (medmerge.merge.search), what `medmerge run`
records as a method's best setting, and what a federated coordinator sends to its sites (where the
experts are site names; locally they are folders). Numbers are finite; unknown keys are errors.

    method      a registered merge method (medmerge.merge.registry)
    parameters  the method's parameters by their YAML names (λ as "lambda", …); a method with random
                masks gets `seed` added when its MergeConfig is built
    weights     w_i, one per expert (a greedy soup's candidate: every member 1)
    seed        the seed of the method's random masks (DARE, DELLA); ignored by the others
    experts     the experts, in the order of `weights`: folders, or names that `folders` maps
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import ConfigDict, Field, StrictBool, StrictInt, model_validator

from medmerge.config import MergeConfig, MergeInput
from medmerge.config.base import StrictModel

Parameter = StrictBool | StrictInt | float | Annotated[str, Field(max_length=64)]


class Recipe(StrictModel):
    """One merge of `experts` (see module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: str = Field(max_length=64)
    parameters: dict[Annotated[str, Field(max_length=64)], Parameter] = Field(
        default_factory=dict, max_length=64
    )
    weights: list[float] = Field(max_length=4096)
    seed: StrictInt = 0
    experts: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=4096)

    @model_validator(mode="after")
    def _one_weight_per_expert(self) -> Recipe:
        if len(self.weights) != len(self.experts):
            raise ValueError(f"{len(self.weights)} weights for {len(self.experts)} experts")
        return self

    def merge_config(self, base_model: str, folders: Mapping[str, str] | None = None) -> MergeConfig:
        """The MergeConfig of this recipe over the experts' folders (`folders[name]`, or the names
        themselves as folders). A greedy-soup method gives the uniform linear merge of the experts with
        weight > 0, the merge its search scored; a method with random masks gets `seed`."""
        from medmerge.merge.registry import get_method
        from medmerge.merge.soup import soup_config

        spec = get_method(self.method)
        paths = [folders[e] if folders is not None else e for e in self.experts]
        models = [MergeInput(path=p, weight=w) for p, w in zip(paths, self.weights, strict=True)]
        if spec.needs_scorer:
            request = MergeConfig(method=self.method, base_model=base_model, models=models)
            return soup_config(request, [m for m in models if m.weight > 0])
        parameters = dict(self.parameters)
        if spec.random_masks:
            parameters["seed"] = self.seed
        return MergeConfig(method=self.method, base_model=base_model, models=models, parameters=parameters)
