"""Weight-only INT8 / INT4 on the `small` preset: memory, logits error, decode speed, matvec kernels.

One random `small` model (init_weights(seed=0), as bench/decode.py builds it) in six forms:
fp32, bf16 (model.to(bfloat16)), int8 and int4 (quantize_model on the fp32 model; lm_head kept), and
bf16/int8, bf16/int4 (quantize_model on the bf16 model: activations, embeddings, norms, lm_head bf16).

  memory      state bytes (parameters + buffers) as stored, accounting's prediction next to it, and
              the bytes the Engine's fast path derives on top (folded / fused copies; quantized
              weights stay quantized only once fastpath uses moonlet.model.quant -- see LOG)
  error       logits vs fp32 on 4 x 64 random tokens: relative L2 error, top-1 agreement; also int8 /
              int4 with lm_head quantized too (why it is kept by default)
  decode      tok/s at batch 1 through the Engine, 32-token prompt, greedy:
              n / (time(1 + n new) - time(1 new)), best of the rounds, the forms interleaved
              round by round so they see the same machine load
  prefill     tok/s of a fresh 256-token prompt (+ 1 new token), interleaved the same way
  trained     with --checkpoint DIR --text FILE: the same forms of a trained checkpoint, mean NLL and
              perplexity on 8 x 256 tokens of FILE, logits error vs its fp32 (random weights exaggerate
              relative logit errors: their logits barely vary, so any rounding moves them a lot)
  matvec      us per y = x @ W^T with one activation row, per weight shape of `small` and 4096x4096:
              fp32 / bf16 F.linear, int8 dequant + F.linear, torch._weight_int8pack_mm with fp32 and
              bf16 activations, int4 dequant + F.linear, torch._weight_int4pack_mm_for_cpu (bf16)

    PYTHONPATH=src python bench/quant.py            # ~3 min on a quiet machine, 1 thread
    PYTHONPATH=src python bench/quant.py --quick    # fewer tokens and reps
    PYTHONPATH=src python bench/quant.py --checkpoint runs/demo/pretrain --text runs/demo/val.txt
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from moonlet import accounting as acc
from moonlet.config import preset
from moonlet.infer import Engine, SamplingParams
from moonlet.model import CausalLM
from moonlet.model.quant import QuantWeight, dequantize, quantize_int4, quantize_int8, quantize_model, storage_bytes


FORMS = ("fp32", "bf16", "int8", "int4", "bf16/int8", "bf16/int4")  # decode + memory
ERROR_FORMS = FORMS + ("int8+lm_head", "int4+lm_head")  # + the lm_head quantized too


def parse_form(form: str) -> tuple[torch.dtype, str | None, bool]:
    """"bf16/int4+lm_head" -> (float dtype of the rest, scheme, lm_head quantized too)."""
    dtype = torch.bfloat16 if form.startswith("bf16") else torch.float32
    scheme = "int8" if "int8" in form else "int4" if "int4" in form else None
    return dtype, scheme, form.endswith("+lm_head")


def apply_form(m: CausalLM, form: str) -> CausalLM:
    dtype, scheme, lm_head = parse_form(form)
    m = m.to(dtype)
    if scheme:
        quantize_model(m, scheme, skip=() if lm_head else ("lm_head",))
    return m


def build(form: str) -> CausalLM:
    return apply_form(CausalLM(preset("small")).init_weights(seed=0).eval(), form)


def trained(ckpt: str, text: str, n_seq: int = 8, T: int = 256) -> dict:
    from moonlet.data.tokenizer import Tokenizer
    from moonlet.train.checkpoint import load_model, resolve_checkpoint

    d = resolve_checkpoint(ckpt)
    with open(text) as f:
        ids = Tokenizer.from_file(d).encode(f.read())
    if len(ids) < n_seq * (T + 1):
        raise ValueError(f"{text} has {len(ids)} tokens; need {n_seq * (T + 1)}")
    batch = torch.tensor(ids[: n_seq * (T + 1)]).view(n_seq, T + 1)
    x, y = batch[:, :-1], batch[:, 1:]
    res, ref = {}, None
    for form in ERROR_FORMS:
        m = apply_form(load_model(d).eval(), form)
        with torch.no_grad():
            logits = m(x).logits.float()
        ref = logits if ref is None else ref
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        res[form] = {"nll": round(nll, 4), "ppl": round(float(torch.tensor(nll).exp()), 3),
                     "rel_l2": round(((logits - ref).norm() / ref.norm()).item(), 5),
                     "top1_agree": round((logits.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)}
        print("trained", form, res[form], flush=True)
    return res


def derived_bytes(eng: Engine) -> int:
    """Bytes of tensors the fast path holds that do not share storage with the model's state."""
    if eng.fast is None:
        return 0
    own = {t.untyped_storage().data_ptr() for t in eng.model.state_dict().values()}
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            p = x.untyped_storage().data_ptr()
            if p not in own and p not in seen:
                seen.add(p)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, QuantWeight):
            for t in (x.qweight, x.scale):
                visit(t)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module):
            for y in vars(x).values():
                visit(y)

    visit(eng.fast.attn)
    visit([w for _, _, w in eng.fast.mlp])
    return total


def speed(engines: dict[str, Engine], n_new: int, rounds: int, prefill_len: int = 256) -> dict[str, dict]:
    """Best-of-rounds decode and prefill tok/s per engine, the engines interleaved round by round
    (same load for all). Prefill: a fresh `prefill_len`-token prompt and one new token."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, preset("small").vocab_size, (32,), generator=g).tolist()
    long_prompt = torch.randint(0, preset("small").vocab_size, (prefill_len,), generator=g).tolist()

    def run(eng, p, n):
        t = time.perf_counter()
        eng.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - t

    dec, pre = {}, {}
    for eng in engines.values():
        run(eng, prompt, 4)  # warm-up
    for _ in range(rounds):
        for name, eng in engines.items():
            dec[name] = min(dec.get(name, float("inf")), run(eng, prompt, 1 + n_new) - run(eng, prompt, 1))
            pre[name] = min(pre.get(name, float("inf")), run(eng, long_prompt, 1))
    return {"decode_tok_s": {k: round(n_new / v, 1) for k, v in dec.items()},
            "prefill_tok_s": {k: round(prefill_len / v) for k, v in pre.items()}}


def time_us(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


def matvec(shapes, reps: int) -> list[dict]:
    rows = []
    for N, K in shapes:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(N, K, generator=g)
        x = torch.randn(1, K, generator=g)
        wb, xb = w.bfloat16(), x.bfloat16()
        q8, s8 = quantize_int8(w)
        q4, s4 = quantize_int4(w, 32)
        r = {"shape": f"{N}x{K}",
             "fp32": time_us(lambda: F.linear(x, w), reps),
             "bf16": time_us(lambda: F.linear(xb, wb), reps),
             "int8 dequant": time_us(lambda: F.linear(x, dequantize("int8", q8, s8, torch.float32)), reps),
             "int8pack fp32 act": time_us(lambda: torch._weight_int8pack_mm(x, q8, s8.float()), reps),
             "int8pack bf16 act": time_us(lambda: torch._weight_int8pack_mm(xb, q8, s8), reps),
             "int4 dequant": time_us(lambda: F.linear(x, dequantize("int4", q4, s4, torch.float32)), reps)}
        if N % 16 == 0:  # the CPU int4 kernel's layout needs N % 16 == 0
            packed = torch._convert_weight_to_int4pack_for_cpu((q4_int := _unpacked(q4)) + 8, 1)
            del q4_int
            sz = torch.stack((s4.t(), torch.zeros_like(s4.t())), -1).contiguous()  # [K/32, N, 2] bf16
            r["int4pack bf16 act"] = time_us(lambda: torch._weight_int4pack_mm_for_cpu(xb, packed, 32, sz), reps)
        rows.append(r)
    return rows


def _unpacked(p: torch.Tensor) -> torch.Tensor:
    from moonlet.model.quant import unpack_int4

    return unpack_int4(p).to(torch.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--rounds", type=int, help="decode rounds (default 3, --quick 2)")
    ap.add_argument("--checkpoint", help="a trained checkpoint (or run dir) for the perplexity section")
    ap.add_argument("--text", help="text file the perplexity section reads (with --checkpoint)")
    ap.add_argument("--skip-small", action="store_true", help="only the --checkpoint section and the matvecs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_new, rounds, reps = (16, 2, 20) if args.quick else (64, 3, 100)
    rounds = args.rounds or rounds
    cfg = preset("small")
    from moonlet.infer import fastpath

    hooked = hasattr(fastpath, "cat_rows")  # docs/quant_fastpath_hook.diff applied: quantized weights stay quantized
    out: dict = {"threads": args.threads, "fastpath_quant_hook": hooked, "memory": {}, "error": {}, "decode_tok_s": {}}
    print(f"threads {args.threads}, fast path {'with' if hooked else 'without'} the quant hook", flush=True)

    if args.checkpoint:
        out["trained"] = trained(args.checkpoint, args.text)
    ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    ref, engines = None, {}
    for form in () if args.skip_small else ERROR_FORMS:
        m = build(form)
        with torch.no_grad():
            logits = m(ids).logits.float()
        if ref is None:
            ref = logits
        out["error"][form] = {"rel_l2": round(((logits - ref).norm() / ref.norm()).item(), 5),
                              "top1_agree": round((logits.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)}
        if form not in FORMS:
            continue
        eng = Engine(m, max_batch=1, max_seq=max(256, 32 + n_new) + 8)
        dtype, scheme, _ = parse_form(form)
        width = "bf16" if dtype == torch.bfloat16 else "fp32"
        predicted = (acc.quantized_weight_bytes(cfg, scheme, dtype=width)["total"] if scheme
                     else acc.weight_bytes(cfg, width, include_mtp=True))
        out["memory"][form] = {"state_MiB": round(storage_bytes(m) / 2**20, 1),
                               "accounting_MiB": round(predicted / 2**20, 1),
                               "fastpath_extra_MiB": round(derived_bytes(eng) / 2**20, 1)}
        engines[form] = eng
        print(form, out["memory"][form], out["error"][form], flush=True)
    if engines:
        out.update(speed(engines, n_new, rounds))
        print("decode b1 tok/s (best of rounds, interleaved):", out["decode_tok_s"], flush=True)
        print("prefill tok/s, 256-token prompt:", out["prefill_tok_s"], flush=True)
        del engines, eng, m

    shapes = sorted({(q.shape[-2], q.shape[-1]) for q in build("int8").modules() if isinstance(q, QuantWeight)})
    out["matvec_us"] = matvec(shapes + [(4096, 4096)], reps)
    cols = list(out["matvec_us"][0])
    print("matvec, one activation row, median us:")
    print(" | ".join(cols))
    for r in out["matvec_us"]:
        print(" | ".join(r[c] if c == "shape" else f"{r.get(c, float('nan')):.0f}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
