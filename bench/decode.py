"""Inference speed: moonlet's engine vs transformers' DeepseekV3ForCausalLM on the same weights (issue 4).

For each preset (tiny, small) one random model is saved with moonlet's save_pretrained and loaded by
both; the script checks they give the same logits, then measures, interleaving the two frameworks
round by round so both see the same machine load (best of the rounds is reported):

  prefill     tokens/s of one 512-token prompt (forward that fills the cache)
  decode b1   tokens/s at batch 1, 32-token prompt, 128 new tokens (greedy)
  decode b8   tokens/s at batch 8, 32-token prompts, 128 new tokens
  decode 2k   tokens/s at batch 1 with 2048 tokens of context (32 new tokens)
Decode time = time(prompt + n new tokens) - time(prompt + 1 new token), so prefill is excluded on both
sides; at 2k context, the time from the first to the last streamed token (moonlet's stream, a
transformers streamer), since there the 2k prefill's own noise would swamp the difference. transformers runs `generate(do_sample=False)` with its fastest experts implementation on this
machine (each one is timed first; the choice is printed), in the same dtype as moonlet; bf16 rows are
also divided by transformers' fp32 numbers (the issue's reference), as are `--dtypes int8` / `int8-bf16`
rows (moonlet with INT8 weight-only weights quantized from the same model; fp32 / bf16 activations). Also: KV-cache bytes per token (both, measured
from the caches' tensors), peak RSS, memory bandwidth (a big tensor copy), and a roofline line: decode
tok/s at batch 1 / (bandwidth / weight bytes one token reads). `--spec-checkpoint DIR` adds MTP
speculative decoding on a trained checkpoint (k = 0, 1, 2 interleaved, ratios to k = 0, acceptance
printed; and the k = 1 ceiling by weight reads: a draft re-reads a fraction f of a main step's
weights, the verify's second token a fraction r in its own routed experts, for <= 1 + a tokens). `--compile` builds
moonlet's engines with compile=True (decode steps through torch.compile graphs, moonlet/infer/compiled.py:
one for batch 1, one for batches); the warm-up decode of each batch size compiles its graph, outside the
timed rounds (the seconds are printed).

    PYTHONPATH=src python bench/decode.py                  # tiny + small, fp32 and bf16 (~10 min quiet)
    PYTHONPATH=src python bench/decode.py --quick          # fewer tokens and rounds
    PYTHONPATH=src python bench/decode.py --spec-checkpoint runs/tiny --presets   # speculative only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import tempfile
import time
import warnings

import torch

from moonlet import accounting as acc
from moonlet.config import preset
from moonlet.infer import Engine, SamplingParams
from moonlet.model import CausalLM
from moonlet.model.quant import quantize_model

LLAMA_CPP_SMALL_2T = {"decode f32": 422, "decode q8_0": 951, "prefill": 3970}  # tok/s, from the brief


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bandwidth_gbs(mb: int = 256, reps: int = 5) -> float:
    """Copy bandwidth (read + write bytes / s) of a tensor far bigger than the caches."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def weight_bytes_per_token(cfg, dtype_bytes: int) -> float:
    """Bytes of weights a batch-1 decode step reads: active params minus the embedding (one row)."""
    return acc.param_counts(cfg)["active_excl_embedding"] * dtype_bytes


# ---- moonlet ------------------------------------------------------------------------------------------
def ml_generate(eng: Engine, prompts: list[list[int]], n: int) -> float:
    t = time.perf_counter()
    eng.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
    return time.perf_counter() - t


def ml_stream_decode(eng: Engine, prompt: list[int], n: int) -> float:
    """Seconds from the first generated token to the n-th (n - 1 decode steps, prefill excluded)."""
    times = [time.perf_counter() for _ in eng.stream(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))]
    return times[-1] - times[0]


def ml_prefill(eng: Engine, prompt: list[int]) -> float:
    cache = eng.new_cache(1, len(prompt) + 1)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        eng.prefill(ids, cache.view(0, 1))
        return time.perf_counter() - t


# ---- transformers -------------------------------------------------------------------------------------
def hf_generate(hf, prompts: list[list[int]], n: int) -> float:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0)
        return time.perf_counter() - t


class _TokenTimes:
    """A transformers streamer that only records when each put() arrives (the prompt's, then one per token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_stream_decode(hf, prompt: list[int], n: int) -> float:
    """Seconds from the first generated token to the n-th (n - 1 decode steps, prefill excluded)."""
    ids = torch.tensor([prompt])
    st = _TokenTimes()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, streamer=st)
    return st.times[-1] - st.times[1]


def hf_prefill(hf, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        hf(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t


def hf_kv_bytes_per_token(hf, T: int = 16) -> float:
    with torch.inference_mode():
        out = hf(torch.arange(1, T + 1)[None], use_cache=True)
    total = 0
    cache = out.past_key_values
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None:
                total += t.nbytes
    return total / T


def load_hf(path: str, impl: str, dtype: torch.dtype = torch.float32):
    from transformers import DeepseekV3ForCausalLM

    with contextlib.redirect_stdout(io.StringIO()):  # its load report lists the MTP layer it ignores
        hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=impl).eval()
    hf.generation_config.eos_token_id = None
    return hf


# ---- one preset -----------------------------------------------------------------------------------------
def timed_pair(rounds: int, fn_ml, fn_hf) -> tuple[float, float]:
    """Best time of each over interleaved rounds."""
    best_ml = best_hf = float("inf")
    for _ in range(rounds):
        best_ml = min(best_ml, fn_ml())
        if fn_hf is not None:
            best_hf = min(best_hf, fn_hf())
    return best_ml, best_hf


def bench_preset(name: str, args) -> dict:
    cfg = preset(name)
    g = torch.Generator().manual_seed(0)

    def prompts(b, t):
        return [torch.randint(7, cfg.vocab_size, (t,), generator=g).tolist() for _ in range(b)]

    model = CausalLM(cfg).init_weights(seed=0).eval()
    res: dict = {"preset": name, "threads": torch.get_num_threads()}
    tmp = tempfile.mkdtemp(prefix=f"bench_decode_{name}_")
    model.save_pretrained(tmp)
    hf = None
    if not args.no_hf:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        p8 = prompts(1, 32)
        times = {}
        for impl in ("eager", "batched_mm", "grouped_mm"):
            try:
                cand = load_hf(tmp, impl)
                hf_generate(cand, p8, 4)
                times[impl] = min(hf_generate(cand, p8, 16) for _ in range(2))
            except Exception as e:  # noqa: BLE001  (an implementation this build does not have)
                print(f"  transformers experts={impl}: unavailable ({type(e).__name__})")
        impl = min(times, key=times.get)
        res["hf_experts_impl"] = impl
        res["hf_impl_times_16tok"] = {k: round(v, 4) for k, v in times.items()}
        hf = load_hf(tmp, impl)
        ids = torch.tensor(prompts(1, 64))
        with torch.inference_mode():
            res["max_logit_diff_vs_hf"] = float((model(ids).logits - hf(ids).logits).abs().max())
    n_new, ctx_new = (32, 16) if args.quick else (128, 32)
    rounds = 2 if args.quick else args.rounds
    for dtype_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32,
                 "int8-bf16": torch.bfloat16}[dtype_name]
        m = model if dtype_name == "fp32" else CausalLM(cfg).init_weights(seed=0).to(dtype).eval()
        if dtype_name.startswith("int8"):  # the same weights, INT8 weight-only (moonlet.model.quant)
            quantize_model(m, "int8")
        eng = Engine(m, max_batch=8, max_seq=2048 + ctx_new + 8, compile=args.compile)
        # transformers in the same dtype (bf16: its fastest fp32 experts implementation, loaded in bf16)
        hf_d = hf if hf is None or dtype == torch.float32 else load_hf(tmp, res["hf_experts_impl"], dtype)
        use_hf = hf_d is not None
        row: dict = {}
        p512 = prompts(1, 512)[0]
        ml_prefill(eng, p512)
        t_ml, t_hf = timed_pair(rounds, lambda: ml_prefill(eng, p512), (lambda: hf_prefill(hf_d, p512)) if use_hf else None)
        row["prefill"] = (512 / t_ml, 512 / t_hf if use_hf else None)
        for b in (1, 8):
            pb = prompts(b, 32)
            t_warm = time.perf_counter()
            ml_generate(eng, pb, 3)
            if args.compile:
                row[f"compile_s_b{b}"] = time.perf_counter() - t_warm
                print(f"  {name} {dtype_name}: batch-{b} decode graph built in {row[f'compile_s_b{b}']:.1f} s",
                      flush=True)
            # decode time = min over rounds of t(n new) - min over rounds of t(1 new): prefill excluded
            t_ml, t_hf = timed_pair(rounds, lambda: ml_generate(eng, pb, n_new),
                                    (lambda: hf_generate(hf_d, pb, n_new)) if use_hf else None)
            t1_ml, t1_hf = timed_pair(rounds, lambda: ml_generate(eng, pb, 1),
                                      (lambda: hf_generate(hf_d, pb, 1)) if use_hf else None)
            row[f"decode_b{b}"] = (b * (n_new - 1) / (t_ml - t1_ml),
                                   b * (n_new - 1) / (t_hf - t1_hf) if use_hf else None)
        # at 2k context the prompt's prefill dwarfs the decode, so subtracting two generate() times is
        # noise; time from the first to the last generated token instead (stream / HF streamer)
        p2k = prompts(1, 2048)[0]
        r2 = max(1, rounds - 1)
        t_ml, t_hf = timed_pair(r2, lambda: ml_stream_decode(eng, p2k, ctx_new + 1),
                                (lambda: hf_stream_decode(hf_d, p2k, ctx_new + 1)) if use_hf else None)
        row["decode_2k"] = (ctx_new / t_ml, ctx_new / t_hf if use_hf else None)
        kv = eng.new_cache(1, 4)
        row["kv_bytes_per_token"] = (kv.bytes_per_token(), hf_kv_bytes_per_token(hf_d) if use_hf else None)
        row["kv_bytes_formula"] = acc.kv_cache_bytes_per_token(cfg, kv.layers[0].latent.element_size())
        res[dtype_name] = row
        if dtype != torch.float32 and "fp32" in res and res["fp32"]["decode_b1"][1]:
            # against the reference: transformers in fp32
            row["vs_hf_fp32"] = {k: row[k][0] / res["fp32"][k][1] for k in ("prefill", "decode_b1", "decode_b8",
                                                                          "decode_2k")}
            print(f"  {name} {dtype_name} vs transformers fp32: " + ", ".join(
                f"{k} {v:.2f}x" for k, v in row["vs_hf_fp32"].items()), flush=True)
        print(f"  {name} {dtype_name}: " + ", ".join(
            f"{k} {v[0]:.0f}" + (f" vs {v[1]:.0f} ({v[0] / v[1]:.2f}x)" if v[1] else "")
            for k, v in row.items() if isinstance(v, tuple)), flush=True)
    res["peak_rss_mb"] = peak_rss_mb()
    res["weight_bytes_per_token_fp32"] = weight_bytes_per_token(cfg, 4)
    return res


def bench_spec(path: str, args) -> dict:
    out = {"checkpoint": path}
    eng0 = Engine.from_pretrained(path)
    tok = eng0.tokenizer
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    prompt = tok.encode(text, add_bos=tok.bos_id is not None) if tok else list(range(10, 42))
    n = 64 if args.quick else 128
    sp = SamplingParams(max_new_tokens=n, ignore_eos=True)
    engines = {}
    for k in (0, 1, 2):
        engines[k] = Engine(eng0.model, tokenizer=tok, max_batch=1, speculative=k, compile=args.compile)
        engines[k].generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))  # (compiles, with --compile)
    best, rate = {k: float("inf") for k in engines}, {}
    for _ in range(2 if args.quick else 5):  # interleaved rounds: this VM's speed drifts between runs
        for k, eng in engines.items():
            t = time.perf_counter()
            r = eng.generate([prompt], sp)[0]
            best[k] = min(best[k], time.perf_counter() - t)
            rate[k] = r.spec_accept_rate
    for k in engines:
        out[f"k{k}"] = {"tok_s": n / best[k], "accept_rate": rate[k], "vs_k0": best[0] / best[k]}
        print(f"  speculative k={k}: {n / best[k]:.1f} tok/s ({best[0] / best[k]:.2f}x k=0)"
              + (f", acceptance {rate[k]:.1%}" if rate[k] is not None else ""), flush=True)
    # what a k = 1 round reads, in main steps' worth of weights (embedding rows aside): the draft
    # re-reads MTP's block + eh_proj + the head (f); the verify's second token reads its own routed
    # experts (r, when the two tokens share none) -- for at most 1 + a tokens at acceptance a
    cfg = eng0.cfg
    pc = acc.param_counts(cfg)
    main_reads = pc["active_excl_embedding"]
    f = (pc["mtp_active"] + pc["lm_head"]) / main_reads
    r = pc["n_moe_layers"] * cfg.num_experts_per_tok * pc["expert"] / main_reads
    a = rate[1] or 0.0
    out.update(draft_read_fraction=f, verify_expert_fraction=r, k1_ceiling_shared_experts=(1 + a) / (1 + f),
               k1_ceiling_disjoint_experts=(1 + a) / (1 + f + r))
    print(f"  k=1 ceiling by weight reads at {a:.0%} acceptance: a draft re-reads f = {f:.0%} of a step, the "
          f"second verified token's experts r = {r:.0%}: (1 + a) / (1 + f) = {(1 + a) / (1 + f):.2f}x if the "
          f"tokens share experts, (1 + a) / (1 + f + r) = {(1 + a) / (1 + f + r):.2f}x if not", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=["tiny", "small"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "int8", "int8-bf16"],
                    help="int8 / int8-bf16: INT8 weight-only with fp32 / bf16 activations (compared with "
                         "transformers fp32 / bf16 and fp32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="32 new tokens (16 at 2k), 2 rounds")
    ap.add_argument("--no-hf", action="store_true", help="moonlet only")
    ap.add_argument("--spec-checkpoint", help="trained checkpoint with MTP for the speculative decoding line")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--compile", action="store_true", help="moonlet engines with compile=True (decode graphs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results: dict = {"torch": torch.__version__, "threads": args.threads, "load": os.getloadavg()}
    bw = bandwidth_gbs()
    results["bandwidth_gbs"] = bw
    print(f"memory bandwidth (copy): {bw:.1f} GB/s; load average {os.getloadavg()[0]:.1f}", flush=True)
    for name in args.presets:
        r = bench_preset(name, args)
        results[name] = r
        for dt, nbytes in (("fp32", 4), ("bf16", 2)):
            if dt in r:
                b1 = r[dt]["decode_b1"][0]
                wb = r["weight_bytes_per_token_fp32"] * nbytes / 4
                bound = bw * 1e9 / wb
                r[f"roofline_fraction_b1_{dt}"] = b1 / bound
                print(f"  {name} roofline: decode b1 {dt} {b1:.0f} tok/s = {b1 / bound:.0%} of bandwidth bound "
                      f"{bound:.0f} tok/s ({wb / 1e6:.1f} MB weights/token)", flush=True)
        if name == "small":
            print(f"  llama.cpp reference (small, 2 threads, from the brief): {LLAMA_CPP_SMALL_2T}", flush=True)
        print(f"  peak RSS so far {r['peak_rss_mb']:.0f} MB", flush=True)
    if args.spec_checkpoint:
        results["speculative"] = bench_spec(args.spec_checkpoint, args)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
