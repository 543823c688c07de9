"""`medmerge ask` and `medmerge export` end to end, question checks and the safety notice."""

from __future__ import annotations

import io
import json

import pytest

from medmerge.cli import main
from medmerge.config import DEFAULT_NOTICE, AnswerConfig, validate_config
from medmerge.config.answer import ANSWER_DECODING, GREEDY, Decoding
from medmerge.errors import MedmergeError
from medmerge.export.answer import answer_stream, check_question, notice_suffix
from medmerge.export.engines import open_engine, prompt_ids, stream_text


def test_question_checks():
    config = AnswerConfig(max_question_chars=10)
    assert check_question("  What?  ", config) == "What?"
    with pytest.raises(MedmergeError, match="question: empty"):
        check_question(" \n\t", config)
    with pytest.raises(MedmergeError, match="11 characters, over the limit of 10"):
        check_question("x" * 11, config)


def test_notice_can_change_but_not_vanish_silently():
    assert notice_suffix(AnswerConfig()) == "\n\n" + DEFAULT_NOTICE
    assert notice_suffix(AnswerConfig(notice="See your GP.")) == "\n\nSee your GP."
    with pytest.raises(MedmergeError, match="notice: .*empty safety notice"):
        validate_config({"notice": "  "}, AnswerConfig, "answer.yaml")
    assert notice_suffix(AnswerConfig(notice="", allow_no_notice=True)) == ""


def test_answer_stream_ends_with_the_notice_and_checks_first(sharp_llama):
    engine = open_engine(sharp_llama, threads=1)
    config = AnswerConfig(max_new_tokens=8, notice="Not medical advice.")
    pieces = list(answer_stream(engine, "What is gout?", config))
    answer = "".join(stream_text(engine, prompt_ids(engine, "What is gout?"), 8, config.decoding))
    assert "".join(pieces) == answer + "\n\nNot medical advice."
    with pytest.raises(MedmergeError, match="empty"):  # raised at the call, before any output
        answer_stream(engine, "", config)


class _CountingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_cli_ask_streams_with_the_chat_template(sharp_llama, monkeypatch):
    out = _CountingStdout()
    monkeypatch.setattr("sys.stdout", out)
    code = main(["ask", str(sharp_llama), "What is gout?", "--max-new-tokens", "10", "--threads", "1"])
    assert code == 0
    text = out.getvalue()
    engine = open_engine(sharp_llama, threads=1)
    expected = "".join(stream_text(engine, prompt_ids(engine, "What is gout?"), 10, ANSWER_DECODING))
    assert text == expected + "\n\n" + DEFAULT_NOTICE + "\n"
    assert out.flushes >= 3  # answer pieces are flushed as they come, then the notice


@pytest.mark.parametrize(
    ("flags", "decoding"),
    [
        ([], ANSWER_DECODING),
        (["--greedy"], GREEDY),
        (["--greedy", "--no-repeat-ngram", "3"], Decoding(no_repeat_ngram_size=3)),
        (
            ["--temperature", "0.7", "--top-p", "0.9", "--seed", "5", "--stop-repeat-tokens", "0"],
            ANSWER_DECODING.model_copy(
                update={"temperature": 0.7, "top_p": 0.9, "seed": 5, "stop_repeat_tokens": 0}
            ),
        ),
    ],
)
def test_cli_ask_decoding_flags(sharp_llama, monkeypatch, flags, decoding):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert (
        main(["ask", str(sharp_llama), "What is gout?", "--max-new-tokens", "10", "--threads", "1", *flags])
        == 0
    )
    engine = open_engine(sharp_llama, threads=1)
    expected = "".join(stream_text(engine, prompt_ids(engine, "What is gout?"), 10, decoding))
    assert out.getvalue() == expected + "\n\n" + DEFAULT_NOTICE + "\n"


def test_cli_ask_rejects_bad_decoding(sharp_llama, capsys):
    assert main(["ask", str(sharp_llama), "hi", "--top-p", "0"]) == 2
    assert "decoding.top_p" in capsys.readouterr().err


def test_cli_ask_errors(sharp_llama, tmp_path, capsys):
    assert main(["ask", str(sharp_llama), "   "]) == 2
    assert "medmerge: error: question: empty" in capsys.readouterr().err
    assert main(["ask", str(sharp_llama), "hi", "--notice", ""]) == 2
    assert "--no-notice-i-understand" in capsys.readouterr().err
    config = tmp_path / "answer.yaml"
    config.write_text("notice: Ask a nurse.\nmax_new_tokens: 3\n")
    assert main(["ask", str(sharp_llama), "hi", "--config", str(config), "--threads", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n\nAsk a nurse.\n")


def test_cli_export_then_ask_the_export(tiny_t5, tmp_path, capsys):
    out = tmp_path / "t5-int8"
    assert (
        main(
            [
                "export",
                str(tiny_t5),
                "--format",
                "ct2",
                "--quant",
                "int8",
                "--out",
                str(out),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "agreement (ct2): greedy token match" in printed
    assert json.loads((out / "medmerge-export.json").read_text())["agreement"]["ct2"]["passed"]
    assert main(["ask", str(out), "What is asthma?", "--max-new-tokens", "6", "--threads", "1"]) == 0
    assert capsys.readouterr().out.endswith(DEFAULT_NOTICE + "\n")
    assert main(["export", str(tiny_t5), "--format", "ct2", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
