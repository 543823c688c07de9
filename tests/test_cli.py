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
