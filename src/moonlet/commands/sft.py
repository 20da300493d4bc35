"""`moonlet sft`: fine-tune a checkpoint on chat JSONL, with the loss on the assistant's tokens only."""

from __future__ import annotations

import argparse

from .train import add_train_options, run as _run

EXAMPLES = """examples:
  moonlet sft --init runs/tiny --data chat.jsonl --out runs/tiny-sft
  moonlet sft --init path/to/hf_checkpoint --tokenizer path/to/hf_checkpoint --data chat.jsonl --out runs/ft
  moonlet sft --out runs/tiny-sft --resume
chat JSONL: one {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} per line.
"""


def register(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens)",
                       description=__doc__ + " Conversations are packed whole into rows; Ctrl-C saves and exits.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(p, "sft")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return _run(args, mode="sft")
