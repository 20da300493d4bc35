"""`moonlet plot RUN_DIR`: draw RUN_DIR/loss.png from metrics.jsonl (also written at the end of training)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss curves (RUN_DIR/loss.png)", description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="image path (default RUN_DIR/loss.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
