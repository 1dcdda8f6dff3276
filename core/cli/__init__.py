"""`python -m core`: the command-line face of the library.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds a parser
whose `handler(args) -> int` does the work. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import LabError
from . import classroom_cmd, compress_cmd, info_cmd, prepare_cmd, runs_cmd, sweep_cmd, train_cmd
from . import export_cmd

COMMANDS = [info_cmd, train_cmd, prepare_cmd, compress_cmd, sweep_cmd, classroom_cmd, runs_cmd]
COMMANDS.append(export_cmd)
from . import pipeline_cmd  # noqa: E402
COMMANDS.append(pipeline_cmd)
from . import sensitivity_cmd; COMMANDS.append(sensitivity_cmd)  # noqa: E402,E702
from . import evaluate_cmd; COMMANDS.append(evaluate_cmd)  # noqa: E402,E702


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m core", description="Model Compression Lab")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for mod in COMMANDS:
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # library notices (a damaged cache entry, missing pretrained weights) go to stderr as one line
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"notice: {msg}", file=sys.stderr)
        try:
            return int(args.handler(args) or 0)
        except LabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: the cache is as it was (finished epochs are kept for resuming)", file=sys.stderr)
            return 130
