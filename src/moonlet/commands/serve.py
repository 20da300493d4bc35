"""`moonlet serve CHECKPOINT`: an OpenAI-compatible API (+ a chat page at /) for a checkpoint."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .generate import add_compile_arg, add_quantize_args, quantize_engine

EPILOG = """\
routes:   POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /metrics (Prometheus)
          (with an API key all of these need it; --public-metrics opens /metrics),
          GET /health (always open), GET /docs (OpenAPI), GET / (chat page)
examples:
  moonlet serve runs/demo/sft                       # then open http://127.0.0.1:8000/
  MOONLET_API_KEY=secret moonlet serve ckpt --host 0.0.0.0 --port 8080
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sft", "messages": [{"role": "user", "content": "What is 2+3?"}]}'
  moonlet eval http://127.0.0.1:8000 --task arith --out eval/arith
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page",
        description="Serve a moonlet checkpoint (or a training run's newest) over the OpenAI API with continuous "
                    "batching: any OpenAI client, `moonlet eval URL`, or the chat page at /.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $MOONLET_API_KEY)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (a scraper that cannot send one, on a trusted network)")
    p.add_argument("--model-name", help="model id in the API (default: the checkpoint directory's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429 (default 64)")
    p.add_argument("--max-seq", type=int, default=None, help="context length per sequence (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default float32; auto = as the checkpoint states)")
    add_quantize_args(p)
    add_compile_arg(p)
    p.add_argument("--max-body-kb", type=int, default=1024, help="request body limit (default 1024 KiB; 413 above)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("max_batch", "max_body_kb"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    from moonlet.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    api_key = args.api_key or os.environ.get("MOONLET_API_KEY") or None
    name = args.model_name or Path(args.checkpoint).resolve().name
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"moonlet serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "port can use the model (set --api-key or MOONLET_API_KEY)", file=sys.stderr)

    from moonlet.infer.engine import Engine
    from moonlet.serve import Server, create_app

    kw = {"max_seq": args.max_seq} if args.max_seq else {}
    engine = Engine.from_pretrained(str(ckpt), dtype=args.dtype, max_batch=args.max_batch, compile=args.compile, **kw)
    quantize_engine(engine, args.quantize, args.quant_group_size, args.quant_experts_only)
    if engine.tokenizer is None:
        raise ValueError(f"{ckpt} has no tokenizer.json: the server needs the checkpoint's tokenizer "
                         "(moonlet tokenizer train, then copy tokenizer.json + tokenizer_config.json there)")
    app = create_app(engine, name, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_body_bytes=args.max_body_kb * 1024, public_metrics=args.public_metrics)
    print(f"moonlet serve: {ckpt} as '{name}' on http://{args.host}:{args.port}/ (context {engine.max_seq}, "
          f"batch {args.max_batch}, queue {args.max_queue}{', API key required' if api_key else ''})", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down gracefully; a no-op handler makes that a clean exit 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    t0 = time.monotonic()
    Server(app, args.host, args.port, graceful_timeout=args.graceful_timeout, log_level=args.log_level).run()
    print(f"moonlet serve: stopped after {time.monotonic() - t0:.0f} s", flush=True)
    return 0
