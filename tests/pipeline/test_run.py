"""`medmerge run` end to end on tiny random models and tiny data; the second run is a cache hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medmerge.cli import main
from medmerge.config import ExperimentConfig, load_config
from medmerge.errors import MedmergeError

TOPICS = {
    "cardio": ["hypertension", "angina", "arrhythmia", "heart failure", "stroke", "anemia"],
    "derma": ["eczema", "psoriasis", "acne", "rosacea", "vitiligo", "melanoma"],
}


def write_set(path: Path, topics: list[str], n: int, offset: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            topic = topics[i % len(topics)]
            row = {
                "question": f"What helps with {topic}? (case {i + offset})",
                "answer": f"For {topic}, see a doctor.",
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("experiment")
    cardio = write_set(root / "cardio.jsonl", TOPICS["cardio"], 40)
    derma = write_set(root / "derma.jsonl", TOPICS["derma"], 40)
    ood = write_set(root / "ood.jsonl", TOPICS["cardio"][:3] + TOPICS["derma"][:3], 6, offset=100)
    config = {
        "base_model": str(tiny_llama),
        "experts": [
            {"name": "cardio", "data": [f"jsonl:{cardio}"]},
            {"name": "derma", "data": [f"jsonl:{derma}"]},
        ],
        "fractions": [0.6, 0.2, 0.2],
        "train": {
            "method": "lora",
            "max_steps": 6,
            "batch_size": 8,
            "learning_rate": 0.01,
            "eval_every": 0,
            "checkpoint_every": 0,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "autocast": "off",
        },
        "threads": 1,
        "isolate_steps": False,  # one process: fast; test_isolated_steps_give_the_same_study runs them apart
        "search": {"trials": 2, "validation_examples": 8, "seed": 0},
        "evaluate": {
            "ood": [f"jsonl:{ood}"],
            "max_new_tokens": 4,
            "bootstrap_resamples": 100,
            "max_examples": 4,
            "examples": 1,
        },
    }
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_end_to_end_then_cached(experiment, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(experiment), "--out", str(out), "--no-ray"]) == 0
    first = capsys.readouterr()
    config = load_config(experiment, ExperimentConfig)
    verdict = json.loads((out / "verdict.json").read_text())["verdict"]
    assert verdict["chosen_merge"] in config.methods and verdict["best_expert"] in ("cardio", "derma")
    evaluated = {row["model"] for row in verdict["table"]}
    assert evaluated == {"base", "cardio", "derma", "multitask", *config.methods}
    for method in config.methods:
        search = json.loads((out / "search" / f"{method}.json").read_text())
        assert search["best"]["loss"] == min(t["loss"] for t in search["trials"])
        for space in ("full", "lora"):
            assert (out / "merges" / f"{method}-{space}" / "merge.json").is_file()
    # the written full-space merge is exactly the search's best trial (its validation loss is reused)
    from medmerge.pipeline.run import _scoring
    from medmerge.pipeline.scoring import score_model

    ties = json.loads((out / "search" / "ties.json").read_text())["best"]
    assert score_model(str(out / "merges" / "ties-full"), _scoring(config))["loss"] == pytest.approx(
        ties["loss"], abs=1e-5
    )
    assert (out / "evaluation" / "report.md").is_file() and (out / "evaluation" / "heatmap.png").is_file()
    assert "chosen merge" in (out / "report.md").read_text()
    assert "| model |" in first.out and "searching ties" in first.err

    assert main(["run", str(experiment), "--out", str(out), "--no-ray"]) == 0
    second = capsys.readouterr()
    assert (
        "training expert" not in second.err and "searching" not in second.err and "merging" not in second.err
    )
    assert second.err.count("cached, skipped") >= 3 + 2 * len(config.methods)
    again = json.loads((out / "verdict.json").read_text())["verdict"]
    assert again["table"] == verdict["table"]


def test_changed_search_setting_reruns_only_search_and_below(experiment, tmp_path, capsys):
    out = tmp_path / "run"
    data = yaml.safe_load(experiment.read_text())
    data["methods"] = ["linear", "ties"]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(data))
    assert main(["run", str(small), "--out", str(out), "--no-ray", "-q"]) == 0
    data["search"]["trials"] = 3
    small.write_text(yaml.safe_dump(data))
    assert main(["run", str(small), "--out", str(out), "--no-ray"]) == 0
    err = capsys.readouterr().err
    assert "training expert" not in err and "expert cardio: cached, skipped" in err
    assert "searching ties (3 trials" in err


def test_isolated_steps_give_the_same_study(experiment, tmp_path):
    """Each heavy step in its own child process (the default, for memory: issue #11 §6) gives the same
    experts, searches and verdict as one process."""
    data = yaml.safe_load(experiment.read_text()) | {"methods": ["ties"], "spaces": ["full"]}
    verdicts = {}
    for isolate in (False, True):
        path = tmp_path / f"isolate-{isolate}.yaml"
        path.write_text(yaml.safe_dump(data | {"isolate_steps": isolate}))
        out = tmp_path / f"run-{isolate}"
        assert main(["run", str(path), "--out", str(out), "--no-ray", "-q"]) == 0
        verdicts[isolate] = json.loads((out / "verdict.json").read_text())["verdict"]["table"]
        search = json.loads((out / "search" / "ties.json").read_text())
        verdicts[isolate].append(search["trials"])
    assert verdicts[True] == verdicts[False]


def test_bad_experiment_configs(tmp_path, experiment):
    data = yaml.safe_load(experiment.read_text())
    for change, message in [
        ({"methods": ["tie"]}, "unknown merge method 'tie'"),
        ({"experts": data["experts"][:1]}, "experts"),
        ({"train": {"model": "x"}}, "train.model: set by the experiment"),
        ({"train": {"method": "lora", "lora": {"r": 0}}}, "r"),
    ]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(MedmergeError, match=message):
            load_config(path, ExperimentConfig)


def test_search_trials_fan_out_over_a_local_ray(experiment, tmp_path):
    """With `ray` installed (an optional extra), trials and validation run as Ray tasks: same results."""
    pytest.importorskip("ray", reason="ray is an optional extra (pip install 'medmerge[ray]')")
    data = yaml.safe_load(experiment.read_text())
    data["methods"] = ["linear", "ties"]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(data))
    assert main(["run", str(small), "--out", str(tmp_path / "local"), "--no-ray", "-q"]) == 0
    assert main(["run", str(small), "--out", str(tmp_path / "ray"), "--ray", "auto-local", "-q"]) == 0
    for method in ("linear", "ties"):
        local = json.loads((tmp_path / "local" / "search" / f"{method}.json").read_text())
        on_ray = json.loads((tmp_path / "ray" / "search" / f"{method}.json").read_text())
        assert [t["loss"] for t in on_ray["trials"]] == pytest.approx(
            [t["loss"] for t in local["trials"]], abs=1e-6
        )
