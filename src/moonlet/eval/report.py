"""The report card: a Markdown page and a small plot from an evaluation's summary and rows."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from moonlet.config import atomic_write_text


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _short(s: Any, n: int = 160) -> str:
    s = str(s).replace("\n", "⏎").replace("|", "\\|")
    return s if len(s) <= n else s[:n] + "…"


def render_markdown(summary: dict, rows: list[dict], plot_name: str | None) -> str:
    task = summary["task"]
    m = summary["metrics"]
    lines = [f"# moonlet eval: {task}", ""]
    meta = [["model", f"`{summary['target']}`"], ["data", f"`{summary['data']}`"],
            ["finished", summary.get("finished_at", "")], ["complete", str(summary.get("complete"))]]
    if task != "ppl":
        s = summary["sampling"]
        meta += [["samples per item", s["samples"]], ["temperature / top-p", f"{s['temperature']} / {s['top_p']}"],
                 ["max new tokens", s["max_new_tokens"]], ["prompt style", "chat" if s.get("chat") else "raw"]]
    if task == "code":
        meta.append(["sandbox", summary.get("sandbox", "")])
    lines += _table(["", ""], meta) + [""]

    if task == "ppl":
        lines += ["## Result", ""]
        lines += _table(["metric", "value"], [
            ["nats / token", f"{m['nll_per_token']:.4f}"], ["perplexity", f"{m['perplexity']:.3f}"],
            ["bits / byte", f"{m['bits_per_byte']:.4f}"], ["bits / token", f"{m['bits_per_token']:.4f}"],
            ["scored tokens", m["n_tokens"]], ["bytes", m["n_bytes"]],
            ["window / stride", f"{m['window']} / {m['stride']}"], ["windows", m["n_windows"]]])
    else:
        lines += ["## Result", ""]
        head = [["items", m["n_items"]], ["completions graded", m["n_rows"]],
                ["accuracy (pass@1)", _pct(m["accuracy"])]]
        for k, v in m.get("pass_at_k", {}).items():
            if k != "1":
                head.append([f"pass@{k}", _pct(v)])
        if "maj_at_n" in m:
            head.append([f"maj@{summary['sampling']['samples']}", _pct(m["maj_at_n"])])
        if "no_answer_rate" in m:
            head.append(["no answer extracted", _pct(m["no_answer_rate"])])
        lines += _table(["metric", "value"], head) + [""]
        for key, title in (("by_subject", "By subject"), ("by_level", "By level")):
            if m.get(key):
                lines += [f"### {title}", ""]
                lines += _table(["", "items", "accuracy"],
                                [[g, v["n"], _pct(v["accuracy"])] for g, v in m[key].items()]) + [""]
        if m.get("failure_reasons"):
            lines += ["### Why completions failed", ""]
            lines += _table(["reason", "count"], [[_short(r, 100), c] for r, c in m["failure_reasons"].items()]) + [""]
        fails = [r for r in rows if r.get("verdict") != "pass"][:5]
        if fails:
            lines += ["### A few failures", ""]
            lines += _table(["item", "extracted", "reason"],
                            [[_short(r["id"], 40), _short(r.get("extracted"), 60), _short(r.get("reason"), 100)]
                             for r in fails]) + [""]
    if plot_name:
        lines += [f"![{task}]({plot_name})", ""]
    lines += ["Per-item results: `items.jsonl`; numbers: `summary.json`.", ""]
    return "\n".join(lines)


def render_plot(summary: dict, rows: list[dict], path: Path) -> bool:
    """A small PNG; False when there is nothing worth plotting."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global figure state, faster import

    task, m = summary["task"], summary["metrics"]
    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if task == "ppl":
        ws = sorted((r for r in rows if r.get("n_scored")), key=lambda r: r["begin"])
        if not ws:
            return False
        ax.plot([r["begin"] for r in ws], [r["nll_sum"] / r["n_scored"] for r in ws], lw=1)
        ax.axhline(m["nll_per_token"], color="k", ls="--", lw=0.8, label=f"mean {m['nll_per_token']:.3f}")
        ax.set_xlabel("window start (token)")
        ax.set_ylabel("nats / token")
        ax.legend(loc="best", fontsize=8)
    elif m.get("pass_at_k") and len(m["pass_at_k"]) > 1:
        ks = sorted(int(k) for k in m["pass_at_k"])
        ax.plot(ks, [100 * m["pass_at_k"][str(k)] for k in ks], marker="o")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_ylim(0, 100)
    elif m.get("by_subject") and len(m["by_subject"]) > 1:
        groups = list(m["by_subject"].items())
        ax.barh([g for g, _ in groups], [100 * v["accuracy"] for _, v in groups])
        ax.set_xlabel("accuracy (%)")
        ax.set_xlim(0, 100)
        ax.tick_params(axis="y", labelsize=7)
    elif m.get("failure_reasons") or m.get("accuracy") is not None:
        labels = ["pass"] + [_short(r, 28) for r in list(m.get("failure_reasons", {}))[:5]]
        vals = [round(m["accuracy"] * m["n_rows"])] + list(m.get("failure_reasons", {}).values())[:5]
        ax.barh(labels[::-1], vals[::-1])
        ax.set_xlabel("completions")
        ax.tick_params(axis="y", labelsize=7)
    else:
        return False
    ax.set_title(f"{task}: {Path(str(summary['target'])).name}", fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def write_report(out_dir: Path, summary: dict, rows: list[dict]) -> Path:
    """report.png (when there is something to plot) and report.md, both written atomically."""
    out_dir = Path(out_dir)
    plotted = render_plot(summary, rows, out_dir / "report.png")
    md = out_dir / "report.md"
    atomic_write_text(md, render_markdown(summary, rows, "report.png" if plotted else None))
    return md
