"""`moonlet eval CHECKPOINT_OR_URL --task math|code|ppl|arith --data FILE --out DIR`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
targets:  a checkpoint dir or training run dir (newest checkpoint), an http(s) URL of an
          OpenAI-compatible server (--model, --api-key), or `oracle` (every item answered with its
          reference solution: checks a data set's tests and answers).
data:     a JSONL file (math/arith: {"problem","answer"}; code: {"prompt","tests","entry_point"?}),
          a text file (ppl), or a built-in set: humaneval (default for code), math-sample (default
          for math), code-stdio-sample. arith without --data generates problems (moonlet.data.tasks).
output:   DIR/items.jsonl (per item), DIR/summary.json, DIR/report.md + report.png. Rerunning with
          the same DIR resumes; different settings are refused unless --overwrite.

examples:
  moonlet eval runs/demo --task arith --out runs/demo/eval/arith
  moonlet eval runs/demo --task ppl --data val.txt --window 256 --out runs/demo/eval/ppl
  moonlet eval http://localhost:8000 --task math --out eval/math
  moonlet eval ckpt --task code --samples 10 --temperature 0.8 --k 1,5,10 --out eval/he
  moonlet eval oracle --task code --data humaneval --out /tmp/he-oracle     # 100% expected
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint or an endpoint (math, code, arithmetic, perplexity)",
        description="Score a moonlet checkpoint or any OpenAI-compatible endpoint on verifiable math and "
                    "code tasks (code runs in a sandbox), synthetic arithmetic, or perplexity / bits per byte.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="CHECKPOINT_OR_URL")
    p.add_argument("--task", required=True, choices=["math", "code", "ppl", "arith"])
    p.add_argument("--data", help="data file or built-in set name (see below)")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    g = p.add_argument_group("sampling")
    g.add_argument("--samples", "-n", type=int, default=1, help="completions per item (default 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, help="default: math 1024, code 512, arith 64")
    g.add_argument("--seed", type=int, default=0, help="sample i of an item uses seed + i")
    g.add_argument("--k", help="pass@k values, e.g. 1,5,10 (default: 1,2,5,10,... up to --samples)")
    style = g.add_mutually_exclusive_group()
    style.add_argument("--chat", dest="chat", action="store_true", default=None,
                       help="prompt through the chat template (default except HumanEval)")
    style.add_argument("--raw", dest="chat", action="store_false", help="plain completion prompts")
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="api_model", help="model name at the endpoint (default: its first model)")
    g.add_argument("--api-key", help="endpoint API key (default: $OPENAI_API_KEY)")
    g.add_argument("--backend", choices=["engine", "naive"], default="engine",
                   help="local decoding: moonlet's engine (default) or the slow cache-free reference")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="local weights dtype")
    g = p.add_argument_group("run")
    g.add_argument("--limit", type=int, help="evaluate the first N items only")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")
    g.add_argument("--workers", type=int, default=2, help="parallel code sandboxes")
    g.add_argument("--timeout", type=float, default=10.0, help="sandbox wall clock per candidate (s)")
    g.add_argument("--memory-mb", type=int, default=1024, help="sandbox memory limit")
    g.add_argument("--window", type=int, default=512, help="ppl: tokens per window")
    g.add_argument("--stride", type=int, help="ppl: window step (default window/2)")
    g.add_argument("--arith-n", type=int, default=200, help="arith without --data: problems to generate")
    g.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moonlet.eval.runner import EvalError, evaluate, headline
    from moonlet.eval.tasks import TaskFormatError

    ks = None
    if args.k:
        try:
            ks = tuple(int(x) for x in args.k.split(","))
        except ValueError:
            raise ValueError(f"--k must be comma-separated integers, got {args.k!r}") from None
        if args.samples < max(ks):
            raise ValueError(f"pass@{max(ks)} needs --samples >= {max(ks)}")
    for name in ("samples", "batch_size", "workers", "window", "memory_mb"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    target = args.target
    if not target.startswith(("http://", "https://")) and target != "oracle" and not Path(target).exists():
        raise FileNotFoundError(f"{target} is neither an existing checkpoint/run directory nor an http(s) URL")
    try:
        summary = evaluate(
            target, args.task, data=args.data, out=args.out, api_model=args.api_model, api_key=args.api_key,
            overwrite=args.overwrite, progress=not args.no_progress, samples=args.samples,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
            chat=args.chat, limit=args.limit, k=ks, batch_size=args.batch_size, workers=args.workers,
            timeout=args.timeout, memory_mb=args.memory_mb, window=args.window, stride=args.stride,
            arith_n=args.arith_n, backend=args.backend, dtype=args.dtype)
    except (EvalError, TaskFormatError) as e:
        raise ValueError(str(e)) from None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.task}: {headline(summary)}")
        print(f"report: {Path(args.out) / 'report.md'}")
    if not summary.get("complete", True):
        print("moonlet eval: warning: not every item was evaluated", file=sys.stderr)
    return 0
