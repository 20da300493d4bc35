"""Training throughput: moonlet vs transformers on the same weights (issue 2 benchmark).

One forward + backward + AdamW step on a batch of 8 x 256 tokens of the `small` preset, in float32 and
with bfloat16 autocast (fp32 master weights), for moonlet's CausalLM and transformers'
DeepseekV3ForCausalLM (its default experts implementation, `grouped_mm`) loaded from the same
checkpoint. Steps are timed interleaved (moonlet, transformers, moonlet, ...) so both see the same
machine load; the script prints tokens/s, the moonlet/transformers ratio (median of per-round ratios),
the fraction of this machine's matmul peak (measured in the same run, interleaved too), the initial
losses (must agree: same weights, same batch) and peak memory (each framework in a fresh child process:
peak RSS during training steps, and how far it rises over the RSS between steps). Both sides use torch's
fused AdamW; the model FLOPs behind "% of peak" are accounting.flops_per_token (causal, no MTP).

    PYTHONPATH=src python bench/train.py                 # both dtypes, ~3 min on 2 cores
    PYTHONPATH=src python bench/train.py --dtypes bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from moonlet import accounting as acc
from moonlet.config import preset
from moonlet.model import CausalLM
from moonlet.interop.hf import save_pretrained, from_pretrained

B, T = 8, 256


def load(impl: str, path: str, compile_: bool = False):
    if impl == "moonlet":
        model = from_pretrained(path, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    if compile_ and impl == "moonlet":
        model = torch.compile(model)
    return model


def make_step(impl: str, model, dtype: str):
    # the same optimizer for both: torch's fused AdamW (6x faster than the foreach default on this CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    amp = dtype == "bf16"

    def step(ids: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if impl == "moonlet":
                labels = torch.full_like(ids, -100)
                labels[:, :-1] = ids[:, 1:]
                loss = model(ids, labels=labels, run_mtp=False).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 3, clock=time.perf_counter) -> float:
    """Best-of GFLOP/s of an n x n x n matmul (the machine's practical matmul ceiling)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n ** 3 / best / 1e9


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl: str, dtype: str, path: str, steps: int) -> None:
    """Run steps in a fresh process; report resident memory (bytes) between steps (weights, gradients
    freed, optimizer states allocated by a first step) and the peak during the next steps (Linux: the
    high-water mark is reset via /proc/self/clear_refs)."""
    torch.manual_seed(0)
    model = load(impl, path)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    step = make_step(impl, model, dtype)
    step(ids)
    between = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        step(ids)
    peak = _status_kib("VmHWM") * 1024
    # live-tensor bytes over one more step, from the profiler's allocator events (RSS also counts what
    # the C allocator keeps after frees, which depends on allocation sizes more than on the model)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        step(ids)
    timeline = os.path.join(tempfile.mkdtemp(prefix="moonlet-bench-mem-"), "timeline.json")
    p.export_memory_timeline(timeline, device="cpu")
    with open(timeline) as f:
        totals = [sum(sizes) for sizes in json.load(f)[1]]
    shutil.rmtree(os.path.dirname(timeline), ignore_errors=True)
    print(json.dumps({"between": between, "peak": peak, "tensor_start": totals[0], "tensor_peak": max(totals)}))


def peak_memory(impl: str, dtype: str, path: str) -> dict:
    env = dict(os.environ)
    r = subprocess.run([sys.executable, __file__, "--child", impl, dtype, path], capture_output=True, text=True,
                       env=env, timeout=900)
    if r.returncode:
        raise RuntimeError(f"child {impl} {dtype} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each: moonlet step, HF step)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per framework per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--compile", action="store_true", help="torch.compile the moonlet model")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time (steadier on a shared machine with --threads 1)")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "DTYPE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(*args.child, steps=2)

    import transformers

    cfg = preset("small")
    flops_tok = acc.flops_per_token(cfg, T, training=True)  # model FLOPs, no MTP (neither side runs it)
    print(f"bench/train.py: small preset ({acc.param_counts(cfg)['total'] / 1e6:.1f}M params, "
          f"{acc.param_counts(cfg)['active'] / 1e6:.1f}M active), batch {B} x {T}, AdamW, {args.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model FLOPs per training token (accounting.flops_per_token, seq {T}): {flops_tok / 1e6:.1f} MFLOP")
    tmp = tempfile.mkdtemp(prefix="moonlet-bench-")
    try:
        run(args, cfg, flops_tok, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, cfg, flops_tok: float, tmp: str) -> None:
    save_pretrained(CausalLM(cfg.replace(num_nextn_predict_layers=0)).init_weights(seed=0), tmp)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    results = {}
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        models = {impl: load(impl, tmp, args.compile) for impl in ("moonlet", "transformers")}
        hf_impl = models["transformers"].config._experts_implementation
        steps = {impl: make_step(impl, m, dtype) for impl, m in models.items()}
        first = {impl: steps[impl](ids) for impl in steps}  # same weights, same batch: same loss
        for _ in range(args.warmup - 1):
            for impl in steps:
                steps[impl](ids)
        times = {impl: [] for impl in steps}
        peaks = []
        mm_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        for r in range(args.rounds):
            order = list(steps) if r % 2 == 0 else list(reversed(steps))
            for impl in order:
                t = clock()
                for _ in range(args.steps):
                    steps[impl](ids)
                times[impl].append((clock() - t) / args.steps)
            peaks.append(matmul_peak(mm_dtype, clock=clock))
        peak = max(peaks)
        tps = {impl: B * T / statistics.median(ts) for impl, ts in times.items()}
        ratio = statistics.median(h / m for m, h in zip(times["moonlet"], times["transformers"]))
        mem = {}
        if not args.no_memory and os.path.exists("/proc/self/clear_refs"):  # Linux only
            mem = {impl: peak_memory(impl, dtype, tmp) for impl in steps}
        results[dtype] = dict(tps=tps, ratio=ratio, peak=peak, first=first, mem=mem, hf_impl=hf_impl)
        print(f"\n[{dtype}{' autocast' if dtype == 'bf16' else ''}] transformers experts_implementation={hf_impl}; "
              f"measured {mm_dtype} matmul peak {peak:.0f} GFLOP/s (2048^3, best of {len(peaks) * 3})")
        for impl in steps:
            frac = tps[impl] * flops_tok / 1e9 / peak
            m = mem.get(impl)
            mtxt = (f"\n{'':15}peak tensor memory {m['tensor_peak'] / 2**30:.2f} GiB (+{(m['tensor_peak'] - m['tensor_start']) / 2**30:.2f} "
                    f"GiB for the step), peak RSS {m['peak'] / 2**30:.2f} GiB") if m else ""
            print(f"  {impl:<13} {tps[impl]:7.0f} tok/s  {frac:5.1%} of peak  first loss {first[impl]:.5f}{mtxt}")
        print(f"  moonlet / transformers: {ratio:.2f}x (median of {args.rounds} interleaved rounds; "
              f"per-round {', '.join(f'{h / m:.2f}' for m, h in zip(times['moonlet'], times['transformers']))})")
        del models, steps
    print("\nsummary: " + "; ".join(f"{d} {r['ratio']:.2f}x ({r['tps']['moonlet']:.0f} vs "
                                      f"{r['tps']['transformers']:.0f} tok/s)" for d, r in results.items()))


if __name__ == "__main__":
    main()
