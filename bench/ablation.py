"""Ablation of the efficiency levers on the `tiny` preset: the same tokens for every variant.

Variants: (c)-(f) are each ONE change from (b); "all" is every lever together. AdamW unless marked.
  dense    (a) dense SwiGLU FFN (intermediate 384 = the MoE layers' active width, 2 routed + 1 shared
               x 128) in every layer + MHA-equivalent attention: q_lora_rank None (plain q_proj) and
               kv_lora_rank 256 = heads x (nope + v), so the KV "latent" is a full-rank projection and
               no bottleneck; reported with the per-head K/V cache an MHA model holds (the module
               itself still caches the 272-wide latent, which here saves nothing worth reporting)
  base     (b) the `tiny` preset: MoE (8 routed experts, top-2, + 1 shared) + MLA + MTP
  mhc      (c) (b) + mHC, 4 residual streams (hc_mult 4; mHC parameters always on AdamW)
  engram   (d) (b) + Engram at layer 1 (2- and 3-grams, 4 heads per order, ~5k-row tables)
  dsa      (e) (b) + DSA (4 index heads x 32 dims, top-64 of the 256-token context), trained from
               scratch in the sparse stage (the indexer learns from its KL alongside the LM loss)
  muonclip (f) (b) trained with MuonClip (Muon + QK-clip, tau 100) instead of AdamW
  all      (b) + mHC + Engram + DSA, with MuonClip
Learning rates: each optimizer's best from the tiny sweep (docs/LOG.md 2026-11-24): AdamW 3e-3,
MuonClip 1e-2 (--lr-adamw, --lr-muon).

Every variant starts from its own seeded init, sees the same batches in the same order (same loader
seed), and is stepped in lockstep with the others (one step of each in turn), so tokens/s ratios
share the machine's load. Validation: the first --eval-batches batches of the held-out split every
--eval-every steps, --final-eval-batches (default: the whole split) at the end. FLOPs per token, parameters and cache bytes per
token come from `moonlet.accounting` (which counts the levers). Results go to a JSON file; --report
rebuilds docs/ablation.md and the plot from it.

    python bench/ablation.py                        # 7 variants x 150 steps x 8 x 256, about 1 h on a busy core
    python bench/ablation.py --seeds 0 1            # two seeds
    python bench/ablation.py --report               # only rewrite docs/ablation.md from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moonlet import accounting as acc  # noqa: E402
from moonlet.config import ModelConfig, preset  # noqa: E402
from moonlet.data.corpus import bundled_documents  # noqa: E402
from moonlet.data.loader import PackedTextLoader, TokenStream  # noqa: E402
from moonlet.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from moonlet.model import CausalLM  # noqa: E402
from moonlet.train.run import training_stage  # noqa: E402
from moonlet.train.trainer import TrainArgs, Trainer  # noqa: E402

ENGRAM = dict(engram_layers=[1], engram_max_ngram=3, engram_heads_per_order=4, engram_dim_per_order=128,
              engram_table_size=5000)
MHC = dict(hc_mult=4)
DSA = dict(model_type="deepseek_v32", index_n_heads=4, index_head_dim=32, index_topk=64)
DENSE_MHA = dict(n_routed_experts=None, intermediate_size=384, q_lora_rank=None, kv_lora_rank=256)
# name -> (label, config changes from `tiny`, optimizer)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "dense": ("(a) dense FFN + MHA-equivalent attn", DENSE_MHA, "adamw"),
    "base": ("(b) MoE + MLA (tiny)", {}, "adamw"),
    "mhc": ("(c) (b) + mHC (n=4)", MHC, "adamw"),
    "engram": ("(d) (b) + Engram (layer 1)", ENGRAM, "adamw"),
    "dsa": ("(e) (b) + DSA (top-64 of 256)", DSA, "adamw"),
    "muonclip": ("(f) (b) + MuonClip", {}, "muonclip"),
    "all": ("all: (b) + mHC + Engram + DSA + MuonClip", {**MHC, **ENGRAM, **DSA}, "muonclip"),
}
NAIVE_CACHE = {"dense"}  # variants whose cache column is the per-head K/V an MHA model holds


def data(work: Path) -> tuple[Tokenizer, TokenStream, TokenStream]:
    """The tokenizer (4096 BPE on the training split) and token streams, cached in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    if (work / "tokenizer" / "tokenizer.json").exists():
        tok = Tokenizer.from_file(work / "tokenizer")
    else:
        tok = train_tokenizer(bundled_documents("train"), vocab_size=4096)
        tok.save(work / "tokenizer")
    if (work / "train.npz").exists() and (work / "val.npz").exists():
        return tok, TokenStream.load(work / "train.npz"), TokenStream.load(work / "val.npz")
    train_s = TokenStream.from_documents(tok, bundled_documents("train"))
    val_s = TokenStream.from_documents(tok, bundled_documents("val"))
    train_s.save(work / "train.npz"), val_s.save(work / "val.npz")
    return tok, train_s, val_s


def variant_config(name: str, tok: Tokenizer) -> ModelConfig:
    return preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id, **VARIANTS[name][1])


def accounting(cfg: ModelConfig, seq_len: int, cache_form: str = "latent") -> dict:
    pc = acc.param_counts(cfg)
    return {
        "params_total": pc["total"], "params_active": pc["active"],
        "params_engram_tables": pc.get("engram_tables", 0),
        "train_flops_per_token": acc.flops_per_token(cfg, seq_len, training=True, include_mtp=True),
        "cache_bytes_per_token_bf16": acc.kv_cache_bytes_per_token(cfg, 2, form=cache_form),
    }


def run(a) -> dict:
    torch.set_num_threads(a.threads)
    tok, train_s, val_s = data(Path(a.work))
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ]
    results = {"command": " ".join([*env, Path(sys.executable).name, *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "conditions": {"threads": a.threads, "cpu": platform.processor() or platform.machine(),
                              "cores": os.cpu_count(), "load_avg_start": os.getloadavg(), "torch": torch.__version__},
               "settings": {k: v for k, v in vars(a).items() if k not in ("report",)},
               "train_tokens": a.steps * a.batch_size * a.seq_len, "val_tokens": len(val_s), "runs": []}
    results["seed_runs"] = {}
    for seed in a.seeds:
        results["seed_runs"][str(seed)] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                           "load_avg_start": os.getloadavg()}
        trainers = {}
        for name in a.variants:
            cfg = variant_config(name, tok)
            model = CausalLM(cfg).init_weights(seed=seed)
            opt = VARIANTS[name][2]
            args = TrainArgs(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, optimizer=opt,
                             lr=a.lr_adamw if opt == "adamw" else a.lr_muon, warmup_steps=max(1, a.steps // 10), min_lr_ratio=0.05, log_interval=10,
                             eval_interval=0, eval_batches=a.eval_batches, seed=seed)
            tl = PackedTextLoader(train_s, a.batch_size, a.seq_len, seed=seed, mtp_depth=cfg.num_nextn_predict_layers)
            vl = PackedTextLoader(val_s, a.batch_size, a.seq_len, shuffle=False)
            extra, fwd = training_stage(model, {})
            tr = Trainer(model, args, tl, vl, progress=False, print_fn=lambda *_: None, extra_losses=extra,
                         forward_kwargs=fwd)
            for g in tr.optimizer.param_groups:  # see --ns-dtype
                if g.get("use_muon"):
                    g["ns_dtype"] = getattr(torch, a.ns_dtype)
            trainers[name] = tr
        state = {n: {"curve": [], "train_time": 0.0, "eval_time": 0.0, "ce": []} for n in trainers}

        def evaluate(step: int, full: bool) -> None:
            for n, tr in trainers.items():
                t0 = time.perf_counter()
                v = tr.evaluate(a.final_eval_batches if full else a.eval_batches)
                state[n]["eval_time"] += time.perf_counter() - t0
                state[n]["curve"].append({"step": step, "tokens": step * a.batch_size * a.seq_len, "val_loss": v,
                                          "train_time_s": state[n]["train_time"], "full": full})

        t_all = time.perf_counter()
        evaluate(0, False)
        for step in range(1, a.steps + 1):
            for n, tr in trainers.items():  # lockstep
                rec = tr.train_step()
                state[n]["train_time"] += rec["step_time"]
                state[n]["ce"].append(rec["ce"])
            if step % a.eval_every == 0 and step < a.steps:
                evaluate(step, False)
            if step % 10 == 0:
                print(f"seed {seed} step {step}/{a.steps} ({time.perf_counter() - t_all:.0f}s) " + ", ".join(
                    f"{n} {sum(state[n]['ce'][-10:]) / 10:.3f}" for n in trainers), flush=True)
        evaluate(a.steps, True)  # (full=True: the final pass, --final-eval-batches batches)
        for n, tr in trainers.items():
            cfg = tr.raw_model.config
            s = state[n]
            results["runs"].append({
                "variant": n, "label": VARIANTS[n][0], "seed": seed, "changes": VARIANTS[n][1],
                "optimizer": tr.args.optimizer, "lr": tr.args.lr,
                "val_loss": s["curve"][-1]["val_loss"], "curve": s["curve"],
                "train_ce_last10": sum(s["ce"][-10:]) / 10, "train_time_s": s["train_time"],
                "tokens_per_s": a.steps * a.batch_size * a.seq_len / s["train_time"],
                "params_counted": sum(p.numel() for p in tr.raw_model.parameters()),
                "config": {k: getattr(cfg, k) for k in ("model_type", "n_routed_experts", "hc_mult", "engram_layers",
                                                         "index_topk")},
            })
        print(f"seed {seed} done in {time.perf_counter() - t_all:.0f}s", flush=True)
        results["seed_runs"][str(seed)].update(wall_s=time.perf_counter() - t_all, load_avg_end=os.getloadavg())
        results["conditions"]["load_avg_end"] = os.getloadavg()
        _save(results, Path(a.json))  # after each seed: a killed run keeps what it finished
    return results


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


# ---- report -------------------------------------------------------------------------------------------
def report(results: dict, doc: Path, plot: Path) -> None:
    tok = Tokenizer.from_file(Path(results["settings"]["work"]) / "tokenizer")
    seq_len = results["settings"]["seq_len"]
    by: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by.setdefault(r["variant"], []).append(r)
    names = [n for n in VARIANTS if n in by]
    base = by.get("base")
    base_by_seed = {r["seed"]: r["val_loss"] for r in base} if base else {}
    base_tps = sum(r["tokens_per_s"] for r in base) / len(base) if base else None
    rows = []
    for n in names:
        rs = by[n]
        cfg = variant_config(n, tok)
        ac = accounting(cfg, seq_len, "naive" if n in NAIVE_CACHE else "latent")
        vals = [r["val_loss"] for r in rs]
        mean = sum(vals) / len(vals)
        tps = sum(r["tokens_per_s"] for r in rs) / len(rs)
        rows.append((n, rs, ac, vals, mean, tps))
    lines = []
    seeds = sorted({r["seed"] for r in results["runs"]})
    s = results["settings"]
    lines.append("| variant | optimizer (lr) | val loss" + (" (seeds " + ", ".join(map(str, seeds)) + ")" if len(seeds) > 1
                                                   else "") + " | vs (b), same seed | params total / active "
                 "| of which Engram tables | train GFLOP/token (incl. MTP) | KV cache B/token (bf16) | tok/s | vs (b) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for n, rs, ac, vals, mean, tps in rows:
        v = " / ".join(f"{x:.4f}" for x in vals) + (f" (mean {mean:.4f})" if len(vals) > 1 else "")
        deltas = [r["val_loss"] - base_by_seed[r["seed"]] for r in rs if r["seed"] in base_by_seed]
        dv = " / ".join(f"{d:+.4f}" for d in deltas) + (f" (mean {sum(deltas) / len(deltas):+.4f})"
                                                         if len(deltas) > 1 else "")
        dt = f"{tps / base_tps:.2f}x" if base_tps else ""
        opt = VARIANTS[n][2]
        lr = rs[0].get("lr", s.get("lr_adamw") if opt == "adamw" else s.get("lr_muon", s.get("lr")))
        cache = f"{ac['cache_bytes_per_token_bf16']:,}" + (" (per-head K/V)" if n in NAIVE_CACHE else "")
        lines.append(f"| {VARIANTS[n][0]} | {'MuonClip' if opt == 'muonclip' else 'AdamW'} ({lr:g}) | {v} | {dv} "
                     f"| {ac['params_total'] / 1e6:.2f}M / {ac['params_active'] / 1e6:.2f}M"
                     f" | {ac['params_engram_tables'] / 1e6:.2f}M | {ac['train_flops_per_token'] / 1e9:.4f} | "
                     f"{cache} | {tps:,.0f} | {dt} |")
    table = "\n".join(lines)
    _plot(rows, plot, seq_len)
    c = results["conditions"]
    header = (f"{results['train_tokens']:,} training tokens per run ({s['steps']} steps x {s['batch_size']} x "
              f"{s['seq_len']}), warmup {max(1, s['steps'] // 10)} steps then cosine to 5% of the lr, "
              f"validation at the end on "
              + (f"the whole held-out split ({results['val_tokens']:,} tokens)" if not s.get("final_eval_batches") else
                 f"the first {s['final_eval_batches'] * s['batch_size'] * s['seq_len']:,} tokens of the held-out split "
                 f"(of {results['val_tokens']:,})") + "; "
              f"{c['threads']} thread(s), load average {c['load_avg_start'][0]:.1f} at the start and "
              f"{c.get('load_avg_end', [float('nan')])[0]:.1f} at the end (shared machine), started {results['started']}.")
    if "seed_runs" in results:
        header += " Seeds run one after the other: " + "; ".join(
            f"seed {k} started {v['started']}, {v['wall_s'] / 60:.0f} min wall"
            + (f", load average {v['load_avg_start'][0]:.1f} -> {v['load_avg_end'][0]:.1f}" if "load_avg_end" in v else "")
            for k, v in results["seed_runs"].items()) + "."
    reading = _READING
    if doc.exists() and "\n## Reading" in doc.read_text():  # keep a hand-written reading when regenerating
        reading = "## Reading" + doc.read_text().split("\n## Reading", 1)[1]
    doc.write_text(_DOC.format(command=results["command"], header=header, table=table, plot=plot.name,
                               reading=reading.rstrip() + "\n"))
    print(table)


def _plot(rows, path: Path, seq_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = 0.0  # zoom on the trained part: the step-0 point (~8.4 for all) falls off the top
    for n, rs, ac, *_ in rows:
        for i, r in enumerate(rs):
            cur = [p for p in r["curve"] if p["val_loss"] is not None]
            full = cur[-1]  # the last point is the whole split; earlier ones its first batches
            xs = [p["tokens"] * ac["train_flops_per_token"] / 1e12 for p in cur]
            ts = [p["train_time_s"] / 60 for p in cur]
            ys = [p["val_loss"] for p in cur]
            top = max([top, *(p["val_loss"] for p in cur if p["step"] > 0)])
            kw = dict(label=VARIANTS[n][0] if i == 0 else None, color=f"C{list(VARIANTS).index(n)}",
                      ls="-" if i == 0 else "--", marker=".")
            ax1.plot(xs, ys, **kw)
            ax2.plot(ts, ys, **kw)
            del full
    ax1.set_xlabel("training compute (TFLOP, model FLOPs incl. MTP)")
    ax2.set_xlabel("training wall time (min, lockstep on a shared CPU)")
    for ax in (ax1, ax2):
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_ylim(top=top + 0.1)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle("tiny preset, same tokens per variant (dashed: second seed; step 0, ~8.4, above the top)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_DOC = """# Ablation: dense/MHA vs MoE/MLA, mHC, Engram, DSA and MuonClip on the `tiny` preset

{header}

Scheme: (b) is the `tiny` preset (MoE + MLA + MTP) trained with AdamW; (c), (d), (e) and (f) each change
ONE thing from (b) (mHC, Engram, DSA, or the optimizer: MuonClip instead of AdamW); (a) replaces both
the MoE and MLA of (b) with a dense FFN and MHA-equivalent attention; "all" is (b) with every lever and
MuonClip. Learning rates are each optimizer's best from the `tiny` sweep (docs/LOG.md 2026-11-24):
AdamW 3e-3, MuonClip 1e-2 (tau 100). Every variant of a seed sees the same batches in the same order,
so the "vs (b), same seed" column is a paired difference; the seed changes both init and data order.

(a) in detail: every layer a dense SwiGLU FFN of width 384 (= the active width of a `tiny` MoE layer,
2 routed + 1 shared expert x 128; the MoE model's first layer is dense at 512), and attention as an
MHA-equivalent: MLA with q_lora_rank None (a plain q_proj) and kv_lora_rank 256 = heads x (nope + v
dims), so K/V come out of a full-rank projection and the latent is no bottleneck (moonlet has no
separate MHA module; the differences from textbook MHA are the RMSNorm on the 256-wide intermediate
and MLA's 16-dim RoPE key shared by the heads). Its cache column is what an MHA model stores, per-head
K and V (`kv_cache_bytes_per_token(form="naive")`): 4 heads x (48 + 32) values x 4 layers x 2 B; the
module as implemented would cache its 272-wide latent, which compresses nothing here.

Command (the JSON with every curve is `bench/ablation_results.json`; `--report` rebuilds this page):

    {command}

{table}

Parameters, FLOPs and cache bytes come from `moonlet.accounting` (`moonlet info` prints the same).
"active" counts what one token touches; Engram's table rows are in the total, and a token reads only
its hashed rows (heads x orders rows of 32 values), so they count as active only through those. FLOPs
are model FLOPs (matmuls, 3x forward for training, MTP included); DSA's are at the causal mean
context of the 256-token rows (mean attended keys 56.1 instead of 128.5, plus the indexer's own
scores over all 128.5). Cache bytes: MLA latent (per-head K/V for (a)) + DSA index keys + Engram
decode state, all layers, bf16. tok/s is training throughput stepped in lockstep (same machine load for every variant).

![validation loss vs training FLOPs and wall time]({plot})

{reading}
"""

_READING = """## Reading

See docs/LOG.md (2026-12-02, levers) for the interpretation of this run; the points that hold
whatever the numbers: this is a few hundred thousand tokens on a 5M-parameter model on a shared CPU,
so differences below ~0.05 nats are within seed noise (compare the two seeds where given), tokens/s
depends on the load of the moment (the lockstep only makes the ratios comparable), and the levers
are designed for scale: DSA pays off at long context (at 256 tokens it only adds indexer work; see
the 8k/16k decode rows in bench/RESULTS.md), mHC and Engram at model sizes where residual width and
memory capacity are the bottleneck.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr-adamw", type=float, default=3e-3, help="AdamW's lr (best of the tiny sweep, docs/LOG.md)")
    ap.add_argument("--lr-muon", type=float, default=1e-2, help="MuonClip's lr (best of the tiny sweep)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8, help="batches of the intermediate validation passes")
    ap.add_argument("--final-eval-batches", type=int, default=0, help="batches of the final pass (0: the whole split)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ns-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="Muon's Newton-Schulz dtype (moonlet's default is bf16; on a CPU without native bf16 "
                         "matmuls, e.g. AVX2-only, fp32 makes the whole step ~3.7x faster at this batch)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "ablation"), help="tokenizer and token cache")
    ap.add_argument("--json", default=str(ROOT / "bench" / "ablation_results.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "ablation.md"))
    ap.add_argument("--report", action="store_true", help="only rebuild the doc and plot from --json")
    a = ap.parse_args()
    results = json.loads(Path(a.json).read_text()) if a.report else run(a)
    report(results, Path(a.doc), Path(a.doc).with_name("ablation.png"))


if __name__ == "__main__":
    main()
