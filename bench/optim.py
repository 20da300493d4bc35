"""AdamW vs Muon vs MuonClip on the bundled corpus with the `tiny` preset, at equal steps.

All runs start from the same initial weights and see the same batches; they are stepped in lockstep
(one step of each in turn), so the step-time ratios are measured under the same machine load.
Reported per run: final validation loss (the whole held-out split: Macbeth + Twelfth Night), the
largest per-head max attention logit seen during training (measured in the forward, scaled as the
softmax sees it) and at the end, heads clipped, and mean step time relative to AdamW.

The MuonClip runs: tau = 100 (Kimi-K2's value) and a binding tau (`--tau-low`, set below the
logits plain Muon reaches here), to show the clip capping the logit and what it costs in loss.

    python bench/optim.py                      # defaults: 150 steps of 16 x 256 tokens per run, 4 runs
    python bench/optim.py --steps 50 --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moonlet.config import preset  # noqa: E402
from moonlet.data.corpus import bundled_documents  # noqa: E402
from moonlet.data.loader import PackedTextLoader, TokenStream  # noqa: E402
from moonlet.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from moonlet.model import CausalLM  # noqa: E402
from moonlet.train.trainer import TrainArgs, Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr-adamw", type=float, default=3e-3)
    ap.add_argument("--lr-muon", type=float, default=1e-2)
    ap.add_argument("--tau-low", type=float, default=5.0,
                    help="a QK-clip threshold that binds on this small model (plain Muon's logits exceed it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_optim", help="tokenizer and token cache")
    ap.add_argument("--quick", action="store_true", help="4 validation batches instead of the whole split")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    work = Path(a.work)
    if (work / "tokenizer" / "tokenizer.json").exists():
        tok = Tokenizer.from_file(work / "tokenizer")
    else:
        tok = train_tokenizer(bundled_documents("train"), vocab_size=4096)
        tok.save(work / "tokenizer")
    if (work / "train.npz").exists() and (work / "val.npz").exists():
        train_s, val_s = TokenStream.load(work / "train.npz"), TokenStream.load(work / "val.npz")
    else:
        train_s = TokenStream.from_documents(tok, bundled_documents("train"))
        val_s = TokenStream.from_documents(tok, bundled_documents("val"))
        train_s.save(work / "train.npz"), val_s.save(work / "val.npz")
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size)
    init = CausalLM(cfg).init_weights(seed=a.seed).state_dict()

    def make(name: str, optimizer: str, lr: float, tau: float = 100.0) -> tuple[str, Trainer]:
        model = CausalLM(cfg)
        model.load_state_dict(init)
        args = TrainArgs(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, optimizer=optimizer, lr=lr,
                         warmup_steps=max(1, a.steps // 10), min_lr_ratio=0.05, qk_clip_tau=tau, log_interval=1,
                         eval_interval=0, eval_batches=4 if a.quick else 0, seed=a.seed)
        tl = PackedTextLoader(train_s, a.batch_size, a.seq_len, seed=a.seed, mtp_depth=cfg.num_nextn_predict_layers)
        vl = PackedTextLoader(val_s, a.batch_size, a.seq_len, shuffle=False)
        return name, Trainer(model, args, tl, vl, progress=False, print_fn=lambda *_: None)

    runs = [make("AdamW", "adamw", a.lr_adamw), make("Muon", "muon", a.lr_muon),
            make("MuonClip tau=100", "muonclip", a.lr_muon, 100.0),
            make(f"MuonClip tau={a.tau_low:g}", "muonclip", a.lr_muon, a.tau_low)]
    hist: dict[str, list[dict]] = {name: [] for name, _ in runs}
    print(f"tiny preset ({sum(p.numel() for p in runs[0][1].raw_model.parameters()) / 1e6:.2f}M params), "
          f"{a.steps} steps x {a.batch_size} x {a.seq_len} tokens, {torch.get_num_threads()} threads", flush=True)
    t_all = time.perf_counter()
    for step in range(a.steps):
        for name, tr in runs:  # lockstep: every run takes its step under the same load
            hist[name].append(tr.train_step())
        if (step + 1) % max(1, a.steps // 10) == 0:
            print(f"  step {step + 1}/{a.steps} ({time.perf_counter() - t_all:.0f}s) " + ", ".join(
                f"{n}: loss {hist[n][-1]['ce']:.3f} max logit {hist[n][-1].get('max_logit', 0):.1f}" for n, _ in runs),
                flush=True)

    print()
    print(f"| run | val loss | val ppl | max logit (peak) | max logit (last 10 steps) | heads clipped (steps) | "
          f"step time vs AdamW |")
    print("|---|---|---|---|---|---|---|")
    base_time = None
    for name, tr in runs:
        val = tr.evaluate()
        h = hist[name]
        peak = max(r.get("max_logit", 0) for r in h)
        last = max(r.get("max_logit", 0) for r in h[-10:])
        clipped_steps = sum(1 for r in h if r.get("clipped_heads"))
        st = sum(r["step_time"] for r in h) / len(h)
        base_time = base_time or st
        print(f"| {name} (lr {tr.args.lr:g}) | {val:.4f} | {math.exp(val):.1f} | {peak:.2f} | {last:.2f} | "
              f"{clipped_steps} | {st / base_time:.2f}x |")
    print(f"\nwall time {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
