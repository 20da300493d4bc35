"""`python -m moonlet.dist.export CKPT [--out DIR]`: consolidate a distributed run's checkpoint.

A sharded run (torchrun ... moonlet train) writes its last checkpoint with both the DCP shards and
a consolidated model.safetensors; its intermediate checkpoints hold only the shards. This reads the
shards in one process (no torchrun, any saved layout) and writes the HF-format weights -- next to
the shards (the checkpoint becomes loadable by transformers too) or into --out (config.json +
model.safetensors + the tokenizer files). `moonlet.train.checkpoint.load_model` reads either form.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..interop.hf import CheckpointError, save_pretrained
from ..train.checkpoint import has_distributed_state, resolve_checkpoint
from .checkpoint import load_consolidated


def export(ckpt: str | Path, out: str | Path | None = None, dtype=None) -> Path:
    d = resolve_checkpoint(ckpt)
    if not has_distributed_state(d):
        raise CheckpointError(f"{d} has no distributed/ shards: it is already a consolidated checkpoint")
    model = load_consolidated(d)
    target = Path(out) if out is not None else d
    save_pretrained(model, target, dtype=dtype)
    if target != d:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (d / name).exists():
                shutil.copy2(d / name, target / name)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moonlet.dist.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    ap.add_argument("--out", help="write here instead of next to the shards")
    ap.add_argument("--dtype", default=None, help="cast weights (bf16, fp32, ...); default: as trained (fp32)")
    args = ap.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.dtype)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"moonlet.dist.export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
