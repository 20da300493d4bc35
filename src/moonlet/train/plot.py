"""`moonlet plot RUN_DIR`: the run's curves from metrics.jsonl as RUN_DIR/loss.png."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (not a moonlet run directory?)")
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return out


def _ema(xs: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Train loss (raw and smoothed) and validation loss vs step, LR, max attention logit and expert
    load imbalance; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    if not train and not val:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training records yet")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["ce"] for r in train], color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps, _ema([r["ce"] for r in train]), color="tab:blue", label="train CE (EMA)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red", ms=3, label="val CE")
    ax.set_xlabel("step"), ax.set_ylabel("nats / token"), ax.set_title("loss"), ax.legend(), ax.grid(alpha=0.3)
    ax = axes[0][1]
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax.set_xlabel("step"), ax.set_title("learning rate"), ax.grid(alpha=0.3)
    ax = axes[1][0]
    ml = [r for r in train if "max_logit" in r]
    if ml:
        ax.plot([r["step"] for r in ml], [r["max_logit"] for r in ml], color="tab:purple")
    ax.set_xlabel("step"), ax.set_title("max attention logit (all layers, heads)"), ax.grid(alpha=0.3)
    ax = axes[1][1]
    im = [r for r in train if r.get("imbalance")]
    if im:
        n = len(im[0]["imbalance"])
        for i in range(n):
            ax.plot([r["step"] for r in im], _ema([r["imbalance"][i] for r in im if len(r["imbalance"]) == n]),
                    lw=1, label=f"MoE layer {i}")
        ax.legend(fontsize=7)
    ax.set_xlabel("step"), ax.set_title("expert load max/mean per MoE layer (MTP last), EMA"), ax.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).name))
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
