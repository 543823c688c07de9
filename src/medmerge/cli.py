"""The `medmerge` command. It only parses, validates and calls library functions.

medmerge data stats SPEC            counts, skipped records, answer lengths, split sizes
medmerge data fetch NAME [--from P] download (or copy) a public dataset into the cache
medmerge train CONFIG --out DIR     fine-tune an expert (full / LoRA / QLoRA)
medmerge merge CONFIG --out DIR     merge models or adapters
medmerge evaluate MODEL --data SPEC --out DIR
medmerge run EXPERIMENT --out DIR   the whole study: experts, merges, search, verdict
medmerge export MODEL --format F --out DIR
medmerge ask MODEL "question"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from medmerge import __version__
from medmerge.errors import MedmergeError

Handler = Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------------- data


def cmd_data_stats(args: argparse.Namespace) -> int:
    from medmerge.data.stats import dataset_stats, format_stats
    from medmerge.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    for spec in args.specs:
        stats = dataset_stats(spec, tokenizer, seed=args.seed, fractions=tuple(args.fractions))
        print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from medmerge.data.fetch import fetch

    path = fetch(args.name, from_path=args.from_path)
    print(f"{args.name}: {path} (SHA-256 verified)")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="medical Q&A datasets: statistics and downloads")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{stats,fetch}")

    stats = data_sub.add_parser("stats", help="counts, skipped records, answer lengths (tokens), split sizes")
    stats.add_argument(
        "specs", nargs="+", metavar="SPEC", help="e.g. medquad:PATH, genmedgpt:PATH, jsonl:PATH"
    )
    stats.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    stats.add_argument(
        "--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST")
    )
    stats.add_argument("--tokenizer", default="smollm2-135m", help="model whose tokens measure lengths")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(handler=cmd_data_stats)

    fetch = data_sub.add_parser(
        "fetch", help="download a public dataset into the cache, verifying its checksum"
    )
    fetch.add_argument("name", choices=["medquad", "genmedgpt", "pubmedqa"])
    fetch.add_argument(
        "--from", dest="from_path", metavar="PATH", help="copy a local file instead of downloading"
    )
    fetch.set_defaults(handler=cmd_data_fetch)


# ------------------------------------------------------------------- commands owned by later work


def _not_implemented(name: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        print(f"medmerge {name}: not implemented yet", file=sys.stderr)
        return 2

    return handler


def _add_placeholder(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=_not_implemented(name))


def _add_train(sub: argparse._SubParsersAction) -> None:
    _add_placeholder(sub, "train", "fine-tune an expert (full / LoRA / QLoRA) on one dataset")


def _add_merge(sub: argparse._SubParsersAction) -> None:
    _add_placeholder(sub, "merge", "merge fine-tuned models or LoRA adapters")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    _add_placeholder(sub, "evaluate", "score models on held-out medical questions")


def _add_run(sub: argparse._SubParsersAction) -> None:
    _add_placeholder(sub, "run", "the whole study: experts, every merge, merge search, verdict")


def _add_export(sub: argparse._SubParsersAction) -> None:
    _add_placeholder(sub, "export", "export a model for edge CPUs (CTranslate2, GGUF)")


def _add_ask(sub: argparse._SubParsersAction) -> None:
    _add_placeholder(sub, "ask", "answer one question, streaming")


# ------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmerge", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"medmerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_data, _add_train, _add_merge, _add_evaluate, _add_run, _add_export, _add_ask):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except MedmergeError as exc:
        print(f"medmerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
