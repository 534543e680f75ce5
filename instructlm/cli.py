"""Entry point of the `instructlm` command.

Each verb is a small module in `instructlm.commands` with `register(subparsers)`; building the parser imports only
those modules (argparse only), and a verb imports its real code (torch, training, service...) when it runs, so
`instructlm serve` never loads training code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from model.errors import UserError

# Verb modules, in the order `instructlm --help` lists them. Add one line per new verb.
COMMAND_MODULES = [
    "instructlm.commands.model",
    "instructlm.commands.data",
    "instructlm.commands.eval",
    "instructlm.commands.viz",
    "instructlm.commands.tokenizer",
    "instructlm.commands.train",
    "instructlm.commands.export",
    "instructlm.commands.serve",
    "instructlm.commands.encoder",
]


def build_parser() -> argparse.ArgumentParser:
    from instructlm import __version__

    parser = argparse.ArgumentParser(prog="instructlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"instructlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as exc:
        # A user's mistake: one line naming what and where, no traceback.
        print(f"instructlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)
