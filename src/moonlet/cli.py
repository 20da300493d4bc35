"""`moonlet <command>`: one entry point; each command lives in `moonlet.commands.<name>`.

A command module defines `register(subparsers)` (adds its parser and sets `func`) and its `run`.
Nothing in the package imports this file.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under moonlet.commands (add a line to add a command)
COMMANDS: dict[str, str] = {
    "convert": "convert",
    "eval": "eval",
    "tokenizer": "tokenizer",
    "train": "train",
    "sft": "sft",
    "plot": "plot",
    "demo": "demo",
    "info": "info",
    "plan": "plan",
    "generate": "generate",
    "chat": "chat",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moonlet",
        description="Train, evaluate and serve DeepSeek-V3 / Kimi-K2 style MoE + MLA models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(f"moonlet.commands.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, non-zero exit
        print(f"moonlet {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
