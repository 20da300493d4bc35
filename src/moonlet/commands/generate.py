"""`moonlet generate CHECKPOINT --prompt TEXT`: stream a completion to the terminal, then tokens/s."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling and loading flags shared by `generate` and `chat`."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, help="sampling seed (same seed -> same output)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence/turn tokens")
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default=None, help="weights dtype: fp32 (default), bf16, fp16, auto (as stored)")
    g.add_argument("--speculative", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="MTP speculative decoding with K draft tokens per step (default K=1 when given)")
    g.add_argument("--max-seq", type=int, help="context length (default: the config's, at most 4096)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    add_quantize_args(g)
    add_compile_arg(g)


def add_compile_arg(g) -> None:
    g.add_argument("--compile", action="store_true",
                   help="decode steps (and speculative verify / MTP steps) through torch.compile graphs: each "
                        "compiles for ~0.5-1 min on first use, then decodes 1.4-2.6x faster on CPU (float and int8 weights)")


def add_quantize_args(g) -> None:
    """`--quantize int8|int4` and its group size (shared by generate, chat and serve)."""
    g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization after loading: int8 per output channel, int4 group-wise "
                        "(embeddings, norms, router and lm_head stay in --dtype)")
    g.add_argument("--quant-group-size", type=int, default=32, metavar="G",
                   help="int4 group size along the input dim (default 32, as Kimi-K2-Thinking)")
    g.add_argument("--quant-experts-only", action="store_true",
                   help="quantize only the routed experts (Kimi-K2-Thinking's INT4 recipe; the rest stays in --dtype)")


def quantize_engine(eng, scheme: str | None, group_size: int = 32, experts_only: bool = False) -> None:
    """Quantize a loaded engine's model in place (and re-derive the fast path's weights); prints the saving."""
    if not scheme:
        return
    from ..model.quant import quantize_model

    try:
        report = quantize_model(eng.model, scheme, group_size=group_size, experts_only=experts_only)
    except ValueError as e:  # e.g. a checkpoint served from its stored int4 / int8 weights
        raise ValueError(f"{e}; drop --quantize {scheme}") from None
    eng.refresh()
    print(f"[quantized {report.summary()}]", file=sys.stderr)


def sampling_params(args):
    from ..infer.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                          seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def load_engine(args):
    import torch

    from ..infer.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    eng = Engine.from_pretrained(args.checkpoint, dtype=args.dtype, max_batch=1, max_seq=args.max_seq,
                                 speculative=args.speculative, compile=getattr(args, "compile", False))
    quantize_engine(eng, getattr(args, "quantize", None), getattr(args, "quant_group_size", 32),
                    getattr(args, "quant_experts_only", False))
    return eng


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint (streams, then prints tokens/s)",
        description="Stream a completion of --prompt from a moonlet or HF-format DeepSeek-V3 checkpoint.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint dir or training run dir (newest checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids (checkpoints without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as one user turn of the chat template")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    eng = load_engine(args)
    tok = eng.tokenizer
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        if tok is None:
            raise ValueError(f"{args.checkpoint} has no tokenizer.json; pass the prompt as --prompt-ids 1,2,3")
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        else:
            ids = eng.encode(args.prompt)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    reason = None
    accept = None
    with contextlib.closing(eng.stream(ids, sampling_params(args))) as events:  # closing drops the request
        try:
            for ev in events:
                n = ev.completion_tokens
                if t_first is None:
                    t_first = time.perf_counter()
                if tok is not None:
                    sys.stdout.write(ev.text_delta)
                elif ev.token_id is not None:
                    sys.stdout.write(f"{ev.token_id} ")
                sys.stdout.flush()
                if ev.finished:
                    reason, accept = ev.finish_reason, ev.spec_accept_rate
        except KeyboardInterrupt:
            reason = "interrupted"
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    decode_s = t1 - (t_first or t1)
    stats = [f"{len(ids)} prompt tokens, {n} generated ({reason})",
             f"prefill {(t_first or t1) - t0:.3f}s",
             f"decode {(n - 1) / decode_s:.1f} tok/s" if n > 1 and decode_s > 0 else "decode -",
             f"overall {n / (t1 - t0):.1f} tok/s"]
    if accept is not None:
        stats.append(f"MTP acceptance {accept:.1%} (k={eng.speculative})")
    print("[" + "; ".join(stats) + "]", file=sys.stderr)
    return 0
