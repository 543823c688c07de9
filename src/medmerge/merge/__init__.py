"""Model merging: every method of the field, exact and streaming, for full models and LoRA adapters.

>>> from medmerge.config import load_config, MergeConfig
>>> from medmerge.merge import merge_models
>>> merge_models(load_config("ties.yaml", MergeConfig), "out/ties")

Methods (one registry, medmerge.merge.registry.METHODS): linear, soup_greedy, slerp, task_arithmetic,
ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, karcher.
Formulas and conventions: docs/merging.md.
"""

from medmerge.merge.engine import merge_models
from medmerge.merge.registry import METHODS, get_method
from medmerge.merge.soup import greedy_soup, loss_scorer

__all__ = ["METHODS", "get_method", "greedy_soup", "loss_scorer", "merge_models"]
