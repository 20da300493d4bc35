"""`moonlet convert SRC DST`: any DeepSeek-V3-format checkpoint -> a clean HF-layout checkpoint.

Reads DeepSeek / Kimi releases (FP8 block-scaled weights are dequantized), checkpoints saved by
transformers, and moonlet's own checkpoints or training runs; writes the HF layout that is also
moonlet's checkpoint format (per-expert tensors, MTP as layer num_hidden_layers, Kimi-K2 written as
deepseek_v3), so the same command imports into moonlet and exports for transformers / llama.cpp.
Streams shard by shard: memory stays around one shard whatever the model size.
With --quantize int4|int8 the model is built, quantized (moonlet.model.quant) and written as a
compressed-tensors checkpoint (Kimi-K2-Thinking's format); that needs the whole model in memory.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (HF / DeepSeek FP8 / moonlet) to HF layout",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (config.json + safetensors) or a moonlet run directory")
    p.add_argument("dst", help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="cast floating weights (default: as stored; FP8 becomes bf16). "
                        "The router's correction bias always stays fp32")
    p.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the multi-token-prediction layers")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    g = p.add_argument_group("quantized output")
    g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="write int8 (per channel) / int4 (groups) weights in compressed-tensors' pack-quantized "
                        "format (builds the model in memory; the rest stays in --dtype, default as stored)")
    g.add_argument("--quant-group-size", type=int, default=32, metavar="G", help="int4 group size (default 32)")
    g.add_argument("--quant-experts-only", action="store_true",
                   help="quantize only the routed experts (Kimi-K2-Thinking's recipe)")
    p.set_defaults(func=run)


def _resolve(path: str) -> Path:
    """A moonlet run directory -> its newest checkpoint (when the training package provides it)."""
    try:
        from ..train.checkpoint import resolve_checkpoint
    except ModuleNotFoundError as e:
        if e.name not in ("moonlet.train", "moonlet.train.checkpoint"):
            raise
        return Path(path)
    return Path(resolve_checkpoint(path))


def _convert_quantized(src: Path, args: argparse.Namespace) -> Path:
    """Load (dequantizing whatever is stored), quantize, write weights and tokenizer files into a fresh
    directory that replaces DST at the end (atomic; nothing of an old DST carried over)."""
    from ..interop.hf import check_destination, copy_tokenizer_files, from_pretrained, save_pretrained
    from ..interop.store import atomic_dir
    from ..model.quant import quantize_model

    dst = Path(args.dst)
    check_destination(src, dst, args.overwrite)
    model = from_pretrained(src, dtype=args.dtype or "auto", mtp=False if args.no_mtp else None)
    report = quantize_model(model, args.quantize, group_size=args.quant_group_size,
                            experts_only=args.quant_experts_only)
    print(f"quantized {report.summary()}", file=sys.stderr)
    with atomic_dir(dst) as tmp:
        save_pretrained(model, tmp, max_shard_size=args.shard_size, mtp=not args.no_mtp)
        copy_tokenizer_files(src, tmp)
    return dst


def run(args: argparse.Namespace) -> int:
    from ..interop.hf import convert_checkpoint

    src = _resolve(args.src)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.quantize:
                dst = _convert_quantized(src, args)
            else:
                dst = convert_checkpoint(src, args.dst, dtype=args.dtype, max_shard_size=args.shard_size,
                                         mtp=not args.no_mtp, overwrite=args.overwrite,
                                         log=lambda m: print(m, file=sys.stderr))
    except OSError as e:  # missing/unwritable paths, DST not empty: one line, no traceback
        print(f"moonlet convert: error: {e}", file=sys.stderr)
        return 1
    finally:
        for w in caught:  # e.g. "no MTP layer in the checkpoint": one line each
            print(f"moonlet convert: warning: {w.message}", file=sys.stderr)
    files = sorted(dst.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    copied = sorted(f.name for f in dst.iterdir() if f.name != "config.json" and f.suffix != ".safetensors"
                    and f.name != "model.safetensors.index.json")
    human = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    print(f"wrote {dst}: {len(files)} safetensors file(s), {human}"
          + (f"; copied {', '.join(copied)}" if copied else ""))
    return 0
