"""`moonlet train`: pretrain a model (a preset or a config.json) on the bundled corpus or your files."""

from __future__ import annotations

import argparse

from ..train.run import SFT_DEFAULTS, TRAIN_DEFAULTS
from ..train.runtime import launch_world_size

EXAMPLES = """examples:
  moonlet train --preset tiny --out runs/tiny                     # the bundled Shakespeare, a new tokenizer
  moonlet train --preset small --data books/ --val-data val.txt --steps 5000 --out runs/small
  moonlet train --config my_config.json --data corpus.jsonl --tokenizer tok/ --precision bf16 --out runs/x
  moonlet train --out runs/tiny --resume                          # continue from the newest checkpoint
  moonlet train --out runs/tiny --resume --steps 4000             # ... and train longer
  torchrun --standalone --nproc-per-node 4 -m moonlet train --preset small --ep 2 --out runs/s4
                                                                  # 4 processes: FSDP2 x expert parallel
  moonlet train --preset tiny --set hc_mult=4 --out runs/mhc      # mHC: 4 residual streams
  moonlet train --preset tiny --set 'engram_layers=[1]' engram_table_size=20011 --out runs/engram
  moonlet train --preset tiny --set model_type=deepseek_v32 index_n_heads=4 index_head_dim=32 index_topk=64 \
      --out runs/dsa                                              # DSA from scratch (sparse stage)
  # DSA on a dense checkpoint: indexer warm-up (everything else frozen), then the sparse stage
  moonlet train --init runs/tiny --set model_type=deepseek_v32 index_n_heads=4 index_head_dim=32 \
      index_topk=64 --dsa-stage warmup --steps 100 --lr 1e-3 --out runs/dsa-warmup
  moonlet train --init runs/dsa-warmup --dsa-stage sparse --steps 300 --out runs/dsa-sparse
"""


def add_train_options(p: argparse.ArgumentParser, mode: str) -> None:
    """Every flag of `moonlet train` / `moonlet sft`; unset flags stay absent (defaults or the resumed run's)."""
    D = SFT_DEFAULTS if mode == "sft" else TRAIN_DEFAULTS
    S = argparse.SUPPRESS

    def opt(group, *flags, help, **kw):
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        d = D.get(dest)
        if d is not None and d != [] and d is not False and "default:" not in help:
            help += f" (default: {d})"
        group.add_argument(*flags, default=S, help=help, **kw)

    g = p.add_argument_group("run")
    opt(g, "--out", "-o", metavar="RUN_DIR", help="run directory: checkpoints/, metrics.jsonl, loss.png")
    opt(g, "--resume", nargs="?", const="latest", metavar="PATH",
        help="continue the run in --out from its newest complete checkpoint, or from checkpoint PATH")
    opt(g, "--steps", type=int, help="total optimizer steps of the run")
    opt(g, "--max-time", type=float, metavar="SECONDS", help="stop cleanly (with a checkpoint) after this much training")
    opt(g, "--seed", type=int, help="seed for initialisation and data order")
    opt(g, "--device", help="cpu, cuda, cuda:N or auto")
    opt(g, "--precision", choices=["fp32", "bf16"], help="bf16 = autocast (weights and optimizer state stay fp32)")

    g = p.add_argument_group("model and data")
    if mode == "sft":
        opt(g, "--init", metavar="CKPT", help="checkpoint or run dir to fine-tune (moonlet or HF DeepSeek-V3 format)")
        opt(g, "--data", nargs="+", metavar="FILE", help='chat JSONL: {"messages": [{"role", "content"}, ...]} per line')
        opt(g, "--val-data", nargs="+", metavar="FILE", help="validation chat JSONL (default: hold out --val-fraction)")
    else:
        opt(g, "--preset", "--config", dest="model", metavar="NAME|config.json",
            help="model: tiny, small, deepseek-v3, kimi-k2, or a config.json")
        opt(g, "--set", nargs="+", metavar="KEY=VALUE", help="override config fields, e.g. --set num_hidden_layers=6")
        opt(g, "--init", metavar="CKPT", help="start from these weights (continued pretraining) instead of random; "
            "--set may then add modules (e.g. DSA's indexers), which start from scratch")
        opt(g, "--data", nargs="+", metavar="PATH",
            help="text files (.txt/.md, one document each), JSONL ({\"text\"} per line), directories of them, "
                 ".gz/.xz ok (default: the bundled Shakespeare corpus)")
        opt(g, "--val-data", nargs="+", metavar="PATH", help="validation files (default: hold out --val-fraction)")
    opt(g, "--val-fraction", type=float, help="share of --data held out for validation when --val-data is not given")
    opt(g, "--tokenizer", metavar="PATH", help="tokenizer.json or its directory (default: the checkpoint's, or train one)")
    if mode != "sft":
        opt(g, "--vocab-size", type=int, help="vocabulary of a newly trained tokenizer (default: the preset's)")

    g = p.add_argument_group("DSA (model_type deepseek_v32)")
    opt(g, "--dsa-stage", choices=["warmup", "sparse"],
        help="warmup: dense attention, only the lightning indexers train (KL to the main attention); "
             "sparse: top-k attention, everything trains (default for a DSA model: sparse)")

    g = p.add_argument_group("batch")
    opt(g, "--batch-size", "-b", type=int, help="rows per micro-batch (per process)")
    opt(g, "--seq-len", type=int, help="tokens per row")
    opt(g, "--grad-accum", type=int, help="micro-batches per optimizer step")

    g = p.add_argument_group("optimizer")
    opt(g, "--optimizer", choices=["adamw", "muon", "muonclip"],
        help="muonclip = Muon (matrices) + AdamW (embeddings, head, norms) + per-head QK-clip")
    opt(g, "--lr", type=float, help="peak learning rate (Muon's update is RMS-matched to AdamW, so one LR serves both)")
    opt(g, "--schedule", choices=["cosine", "wsd", "constant"], help="LR schedule after warmup")
    opt(g, "--warmup-steps", type=int, help="linear warmup steps")
    opt(g, "--min-lr-ratio", type=float, help="final LR as a fraction of --lr")
    opt(g, "--decay-fraction", type=float, help="wsd: fraction of the steps spent decaying")
    opt(g, "--weight-decay", type=float, help="decoupled weight decay (not on embeddings, norms, biases)")
    opt(g, "--beta1", type=float, help="AdamW beta1")
    opt(g, "--beta2", type=float, help="AdamW beta2")
    opt(g, "--muon-momentum", type=float, help="Muon Nesterov momentum")
    opt(g, "--qk-clip-tau", type=float, help="MuonClip: max attention logit allowed per head")
    opt(g, "--grad-clip", type=float, help="clip the global gradient norm (0: off)")

    g = p.add_argument_group("MoE and MTP")
    opt(g, "--bias-update-gamma", type=float, help="aux-loss-free balancing: router bias step per optimizer step (0: off)")
    opt(g, "--balance-alpha", type=float, help="sequence-wise balance loss weight (0: off)")
    opt(g, "--mtp-lambda", type=float, help="weight of the multi-token-prediction loss")

    g = p.add_argument_group("logging and checkpoints")
    opt(g, "--log-interval", type=int, help="steps between log lines")
    opt(g, "--eval-interval", type=int, help="steps between validation passes (0: only at the end)")
    opt(g, "--eval-batches", type=int, help="validation batches per pass (0: the whole validation set)")
    opt(g, "--save-interval", type=int, help="steps between checkpoints (0: only at the end and on Ctrl-C)")
    opt(g, "--keep-last", type=int, help="checkpoints kept (0: all)")
    opt(g, "--max-nonfinite", type=int, help="non-finite steps in a row that stop the run")

    g = p.add_argument_group("distributed (under torchrun; docs/distributed.md)")
    opt(g, "--dp-shard", type=int,
        help="FSDP ranks per expert block; dp-shard x ep = processes (default: processes / ep)")
    opt(g, "--ep", type=int,
        help="expert-parallel ranks: routed experts are split over them (must divide the expert count)")
    opt(g, "--activation-checkpointing", action="store_true",
        help="recompute each block's activations in the backward pass (less memory, ~1 more forward)")


def register(sub) -> None:
    p = sub.add_parser("train", help="pretrain a model (tiny/small/config.json) on text",
                       description=__doc__ + " Ctrl-C saves a checkpoint and exits; --resume continues.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(p, "pretrain")
    p.set_defaults(func=run)


def given_options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command")}


def run(args: argparse.Namespace, mode: str = "pretrain") -> int:
    import os
    import sys

    from ..train.trainer import TrainingDiverged
    from ..train.run import run_training

    try:
        summary = run_training(given_options(args), mode=mode)
    except TrainingDiverged as e:
        print(f"moonlet {args.command}: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, KeyboardInterrupt):
        raise  # the CLI prints one line and exits non-zero
    except Exception as e:
        if launch_world_size() > 1:  # under torchrun: never hang, say which rank and why
            from ..dist.failure import describe_failure

            import traceback

            traceback.print_exc()
            print(describe_failure(e), file=sys.stderr, flush=True)
            os._exit(1)
        raise
    if not summary.get("is_main", True):
        return 0
    val = summary["val_loss"]
    print(f"done: step {summary['step']}, {summary['tokens']:,} tokens, "
          + (f"val loss {val:.4f}, " if val is not None else "")
          + f"{summary['tokens_per_s']:,.0f} tok/s, checkpoint {summary['checkpoint']}")
    return 0
