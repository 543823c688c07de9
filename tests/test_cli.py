"""The `medmerge` command: help, data stats end to end, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medmerge.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "merge", "evaluate", "run", "export", "ask"):
        assert command in out


def test_data_help():
    result = subprocess.run(
        [sys.executable, "-m", "medmerge.cli", "data", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "stats" in result.stdout and "fetch" in result.stdout


def test_data_stats_end_to_end(tiny_qa_jsonl, tiny_llama, capsys):
    assert main(["data", "stats", f"jsonl:{tiny_qa_jsonl}", "--tokenizer", str(tiny_llama), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pairs"] == 40 and stats["duplicates_removed"] == 0
    assert sum(stats["splits"].values()) == 40
    assert stats["answer_tokens"]["p50"] > 0


def test_bad_spec_is_a_one_line_error(capsys):
    assert main(["data", "stats", "nope:x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medmerge: error: dataset SPEC 'nope:x': unknown kind") and "\n" not in err


EVALUATE_FLAGS = [  # every flag `medmerge evaluate` had before its flags were generated (issue 24)
    (["--split", "validation"], {"split": "validation"}),
    (["--split-seed", "3"], {"split_seed": 3}),
    (["--fractions", "0.7", "0.2", "0.1"], {"fractions": (0.7, 0.2, 0.1)}),
    (["--max-examples", "5"], {"max_examples": 5}),
    (["--loss-only"], {"generate": False}),
    (["--max-new-tokens", "17"], {"max_new_tokens": 17}),
    (["--batch-size", "3"], {"batch_size": 3}),
    (["--do-sample"], {"do_sample": True}),
    (["--temperature", "0.5"], {"temperature": 0.5}),
    (["--top-p", "0.8"], {"top_p": 0.8}),
    (["--seed", "4"], {"seed": 4}),
    (["--max-prompt-tokens", "99"], {"max_prompt_tokens": 99}),
    (["--max-answer-tokens", "77"], {"max_answer_tokens": 77}),
    (["--system", "be brief"], {"system": "be brief"}),
    (["--dtype", "bfloat16"], {"dtype": "bfloat16"}),
    (["--bertscore-idf"], {"bertscore_idf": True}),
    (["--bootstrap-resamples", "200"], {"bootstrap_resamples": 200}),
    (["--confidence", "0.9"], {"confidence": 0.9}),
    (["--examples", "2"], {"examples": 2}),
    (["--threads", "1"], {"threads": 1}),
    (["--ood", "jsonl:b.jsonl", "--ood", "csv:c.csv"], {"ood": ["jsonl:b.jsonl", "csv:c.csv"]}),
]


def _evaluate_call(monkeypatch, tmp_path, argv: list[str]) -> dict:
    """The EvaluateConfig and keywords `medmerge evaluate ARGV` hands the evaluation (which is not run)."""
    import medmerge.evaluate.report as report
    import medmerge.evaluate.runner as runner

    seen: dict = {}

    def evaluate(models, config, *, cache_dir, progress):
        seen.update(models=models, config=config, cache_dir=cache_dir, progress=progress)
        return type("Evaluation", (), {"models": models, "datasets": config.data})()

    monkeypatch.setattr(runner, "evaluate", evaluate)
    monkeypatch.setattr(report, "write_evaluation", lambda evaluation, out, overwrite: tmp_path)
    assert main(["evaluate", "m1", "--out", str(tmp_path / "out"), "--data", "jsonl:a.jsonl", *argv]) == 0
    return seen


@pytest.mark.parametrize(("argv", "expected"), EVALUATE_FLAGS, ids=[a[0] for a, _ in EVALUATE_FLAGS])
def test_every_evaluate_flag_keeps_its_name_and_meaning(monkeypatch, tmp_path, argv, expected):
    from medmerge.config import EvaluateConfig

    config = _evaluate_call(monkeypatch, tmp_path, argv)["config"]
    defaults = EvaluateConfig(data=["jsonl:a.jsonl"]).model_dump()
    assert config.model_dump() == defaults | expected


def test_evaluate_without_flags_takes_the_config_file_and_the_defaults(monkeypatch, tmp_path):
    from medmerge.config import EvaluateConfig

    seen = _evaluate_call(monkeypatch, tmp_path, ["--no-cache", "--quiet"])
    assert seen["config"] == EvaluateConfig(data=["jsonl:a.jsonl"])
    assert seen["cache_dir"] is None and seen["progress"] is False and seen["models"] == ["m1"]
    yaml_file = tmp_path / "evaluate.yaml"
    yaml_file.write_text("max_new_tokens: 40\nseed: 9\ngenerate: false\n")
    argv = ["--config", str(yaml_file), "--seed", "2", "--cache-dir", str(tmp_path / "c")]
    seen = _evaluate_call(monkeypatch, tmp_path, argv)
    assert (seen["config"].max_new_tokens, seen["config"].seed, seen["config"].generate) == (40, 2, False)
    assert seen["cache_dir"] == str(tmp_path / "c") and seen["progress"] is True


def test_evaluate_help_names_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    for argv, _ in EVALUATE_FLAGS:
        assert argv[0] in out
    for flag in ("--data", "--out", "--config", "--overwrite", "--cache-dir", "--no-cache", "--quiet"):
        assert flag in out
    for default in ("(128)", "(0.95)", "(1000)", "(float32)", "(test)"):
        assert default in " ".join(out.split()), default


def test_every_evaluate_setting_is_a_flag_with_its_description(capsys):
    """The flags are generated from EvaluateConfig's fields: a new setting is one line in the model."""
    from medmerge.config import EvaluateConfig

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, field in EvaluateConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in out, name
        assert field.description and " ".join(field.description.split()) in out, name


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--generate-examples", "2"], {"generate_examples": 2}),
        (["--no-pubmedqa-accuracy"], {"pubmedqa_accuracy": False}),
        (["--no-generate"], {"generate": False}),
        (["--data", "csv:c.csv"], {"data": ["jsonl:a.jsonl", "csv:c.csv"]}),
    ],
)
def test_settings_without_a_hand_written_flag_have_one(monkeypatch, tmp_path, argv, expected):
    from medmerge.config import EvaluateConfig

    config = _evaluate_call(monkeypatch, tmp_path, argv)["config"]
    assert config.model_dump() == EvaluateConfig(data=["jsonl:a.jsonl"]).model_dump() | expected
