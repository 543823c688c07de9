"""The main job, `medmerge run`: experts → every merge → merge search → evaluation → verdict.

    >>> from medmerge.config import ExperimentConfig, load_config
    >>> from medmerge.pipeline import run_experiment
    >>> run_experiment(load_config("configs/demo.yaml", ExperimentConfig), "runs/demo")

Every step writes a folder with a step key (a hash of everything it depends on); a re-run skips
steps whose key matches and redoes only what a changed setting reaches (medmerge.steps).
"""

from medmerge.pipeline.run import run_experiment

__all__ = ["run_experiment"]
