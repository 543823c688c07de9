"""Model merging: every method of the field, exact and streaming, for full models and LoRA adapters.

>>> from medmerge.config import load_config, MergeConfig
>>> from medmerge.merge import merge_models
>>> merge_models(load_config("ties.yaml", MergeConfig), "out/ties")

soup_greedy needs `scorer=` (a candidate MergeConfig → score, higher is better), e.g.
medmerge.evaluate.scorer.merge_loss_scorer(config.scorer).

Methods (one registry, medmerge.merge.registry.METHODS): linear, soup_greedy, slerp, task_arithmetic,
ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, karcher;
spectral / LoRA-native (medmerge.merge.spectral): knots, tsv, iso_c, iso_cts, core_space; data-aware,
from the sites' statistics (medmerge.merge.data_aware): regmean, fisher; from the experts' training
data, run through the merged model block by block (medmerge.merge.regmean_pp): regmean_plus_plus.
Formulas and conventions: docs/merging.md.
"""

from medmerge.merge.engine import merge_models, merged_state
from medmerge.merge.registry import METHODS, MethodSpec, get_method
from medmerge.merge.soup import Scorer, greedy_soup, greedy_soup_merge

__all__ = [
    "METHODS",
    "MethodSpec",
    "Scorer",
    "get_method",
    "greedy_soup",
    "greedy_soup_merge",
    "merge_models",
    "merged_state",
]
