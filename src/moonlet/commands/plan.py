"""`moonlet plan CONFIG --gpus N --gpu h800 ...`: memory, communication, time and cost of a training run,
computed from the config alone (see moonlet.plan for the model and its assumptions)."""

from __future__ import annotations

import argparse
import json

from ..config import resolve_config
from ..plan import GPUS, PlanArgs, format_plan, parse_count, plan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan a distributed training run: memory per rank, all-to-all, time, cost",
                       description=__doc__)
    p.add_argument("config", metavar="CONFIG", help="preset name, config.json, or a directory holding one")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h800", help="GPU model (peak figures from spec sheets)")
    p.add_argument("--dp-shard", type=int, default=None, help="FSDP sharding degree (default: all GPUs)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides --dp-shard and the experts)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per forward/backward (default 1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization (default 0.4)")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16",
                   help="dense tensor peak the MFU refers to (default bf16)")
    p.add_argument("--price", type=float, default=2.0, help="$ per GPU-hour (default 2)")
    p.add_argument("--tokens", default="1T", help="training tokens, e.g. 14.8T (default 1T)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--dispatch-dtype", choices=("bf16", "fp8"), default="bf16",
                   help="all-to-all dispatch payload (DeepSeek-V3 used fp8)")
    p.add_argument("--mtp", action="store_true", help="count the config's MTP depths (memory, FLOPs, traffic)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.config)
    pa = PlanArgs(cfg=cfg, gpus=args.gpus, gpu=args.gpu, dp_shard=args.dp_shard, ep=args.ep, seq=args.seq,
                  global_batch=args.global_batch, micro_batch=args.micro_batch, mfu=args.mfu, price=args.price,
                  tokens=parse_count(args.tokens), activation_checkpointing=args.activation_checkpointing,
                  optimizer=args.optimizer, precision=args.precision, dispatch_dtype=args.dispatch_dtype,
                  mtp=args.mtp, gpus_per_node=args.gpus_per_node)
    p = plan(pa)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        print(format_plan(p, str(args.config)))
    return 0
