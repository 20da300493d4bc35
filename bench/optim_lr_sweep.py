"""Learning-rate sweep behind bench/optim.py's defaults: several optimizer:lr runs of `tiny` on the
bundled corpus, same init and batches, stepped in lockstep; prints each run's validation loss.

    python bench/optim_lr_sweep.py --steps 120 muonclip:3e-3 muonclip:6e-3 muonclip:1.2e-2 \
        adamw:1.5e-3 adamw:3e-3 adamw:6e-3
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
    ap.add_argument("runs", nargs="+", metavar="OPTIMIZER:LR")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default="runs/bench_optim")
    a = ap.parse_args()
    torch.set_num_threads(2)
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
    init = CausalLM(cfg).init_weights(seed=0).state_dict()
    B, T = a.batch_size, a.seq_len
    runs = []
    for spec in a.runs:
        opt, lr = spec.split(":")
        model = CausalLM(cfg)
        model.load_state_dict(init)
        args = TrainArgs(steps=a.steps, batch_size=B, seq_len=T, optimizer=opt, lr=float(lr),
                         warmup_steps=max(1, a.steps // 10), min_lr_ratio=0.05, log_interval=10 ** 9,
                         eval_interval=0, eval_batches=0)
        runs.append((spec, Trainer(model, args, PackedTextLoader(train_s, B, T, seed=0, mtp_depth=1),
                                   PackedTextLoader(val_s, B, T, shuffle=False), progress=False,
                                   print_fn=lambda *_: None)))
    hist: dict[str, list[dict]] = {n: [] for n, _ in runs}
    t0 = time.time()
    for s in range(a.steps):
        for n, tr in runs:
            hist[n].append(tr.train_step())
        if (s + 1) % max(1, a.steps // 5) == 0:
            print(s + 1, f"{time.time() - t0:.0f}s",
                  " ".join(f"{n}={sum(r['ce'] for r in hist[n][-10:]) / len(hist[n][-10:]):.3f}" for n, _ in runs), flush=True)
    for n, tr in runs:
        v = tr.evaluate()
        st = sum(r["step_time"] for r in hist[n]) / len(hist[n])
        print(f"{n}: val {v:.4f} ppl {math.exp(v):.1f} step {st:.2f}s "
              f"max logit {max(r.get('max_logit', 0) for r in hist[n]):.1f}", flush=True)


if __name__ == "__main__":
    main()
