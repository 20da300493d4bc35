"""`moonlet demo`: the whole path on the bundled corpus, on a laptop CPU, in minutes.

1. train a byte-level BPE on Shakespeare            (moonlet tokenizer train)
2. pretrain the `tiny` preset on it                  (moonlet train --preset tiny)
3. evaluate: validation loss vs the unigram baseline, perplexity and bits/byte on unseen plays
   (moonlet.eval), a few generations through the inference engine (moonlet.infer)
4. fine-tune on synthetic arithmetic / word problems (moonlet sft), graded on held-out problems by
   the eval harness (exact answers), before and after
Everything lands in --out (default runs/demo): tokenizer/, pretrain/, sft/, eval/, summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

MARKER = ".moonlet-demo"
SHAKESPEARE_PROMPTS = ("ROMEO.\n", "HAMLET.\nTo be, or not to be", "KING.\nMy lords,", "ACT I.\n\nSCENE I. ")


def register(sub) -> None:
    p = sub.add_parser("demo", help="tokenizer + pretraining + SFT + evaluation + generations, in minutes on a CPU",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo; a previous demo there is replaced)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default 200)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default 150)")
    p.add_argument("--quick", action="store_true", help="a 1-minute smoke run (few steps; numbers meaningless)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _section(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.corpus import bundled_documents
    from ..data.loader import PackedTextLoader
    from ..data.tasks import TASKS, generate as gen_problems, write_chat_jsonl
    from ..data.tokenizer import train_tokenizer
    from ..eval import evaluate, validation_perplexity
    from ..infer.engine import Engine, SamplingParams
    from ..train.quick_eval import unigram_cross_entropy, unigram_entropy, validation_loss
    from ..train.run import run_training, token_streams

    out = Path(args.out)
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not a previous demo directory; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by `moonlet demo`; the next demo run replaces this directory\n")
    q = args.quick
    pre_steps = args.pretrain_steps or (20 if q else 200)
    sft_steps = args.sft_steps or (10 if q else 150)
    seed = args.seed
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    print(f"moonlet demo: torch {torch.__version__}, {torch.get_num_threads()} threads, output in {out}")

    # 1. tokenizer ---------------------------------------------------------------------------------------
    _section("1. tokenizer: byte-level BPE on the bundled Shakespeare (train split)")
    t = time.perf_counter()
    train_docs = bundled_documents("train")
    tok = train_tokenizer(train_docs, vocab_size=4096)
    tok.save(out / "tokenizer")
    timings["tokenizer_s"] = time.perf_counter() - t
    print(f"{tok.vocab_size} tokens in {timings['tokenizer_s']:.1f}s; "
          f"'But soft, what light' -> {[tok.decode([i], skip_special=False) for i in tok.encode('But soft, what light')]}")

    # 2. pretraining ---------------------------------------------------------------------------------------
    _section(f"2. pretraining the tiny preset for {pre_steps} steps (MLA + MoE with groups + MTP, MuonClip)")
    t = time.perf_counter()
    pre_opts = dict(model="tiny", out=str(out / "pretrain"), tokenizer=str(out / "tokenizer"), steps=pre_steps,
                    batch_size=16, seq_len=256, lr=1e-2, warmup_steps=min(30, pre_steps // 5), optimizer="muonclip",
                    eval_interval=max(1, pre_steps // 6), eval_batches=6 if not q else 2,
                    log_interval=max(1, pre_steps // 30), seed=seed, min_lr_ratio=0.05)
    pre = run_training(pre_opts, mode="pretrain", progress=False)
    timings["pretrain_s"] = time.perf_counter() - t
    model = pre["trainer"].raw_model.eval()

    # 3. evaluation ----------------------------------------------------------------------------------------
    _section("3. evaluation of the pretrained model")
    train_stream, val_stream = token_streams(tok, {"data": None, "val_data": None, "val_fraction": 0.02, "seed": seed},
                                             out / "pretrain", print)
    uni_h = unigram_entropy(train_stream.tokens)
    uni_ce = unigram_cross_entropy(train_stream.tokens, val_stream.tokens, tok.vocab_size)
    val_loader = PackedTextLoader(val_stream, 16, 256, shuffle=False, mtp_depth=0)
    val = validation_loss(model, val_loader, None if not q else 2)
    val_docs = bundled_documents("val")
    chars_per_token = sum(map(len, val_docs)) / len(val_stream)
    print(f"validation (Macbeth + Twelfth Night, unseen plays): loss {val:.3f} nats/token, perplexity {math.exp(val):.1f}, "
          f"{val / math.log(2) / chars_per_token:.2f} bits/character")
    print(f"unigram baseline: entropy {uni_h:.3f} nats/token; the train unigram model scores {uni_ce:.3f} on validation "
          f"-> the model is {uni_ce - val:.2f} nats/token below it")
    print(f"pretraining: {pre['tokens']:,} tokens in {timings['pretrain_s']:.0f}s wall, {pre['tokens_per_s']:,.0f} tok/s "
          f"while training")
    val_txt = out / "val.txt"
    val_text = "\n\n".join(val_docs)
    val_txt.write_text(val_text if not q else val_text[:20_000], encoding="utf-8")
    ppl = validation_perplexity(model=model, tokenizer=tok, text_file=val_txt, window=256, stride=128,
                                out=out / "eval" / "ppl")
    print(f"eval harness (sliding window 256, stride 128): perplexity {ppl['perplexity']:.1f}, "
          f"{ppl['bits_per_byte']:.3f} bits/byte over {ppl['n_tokens']:,} tokens")
    _section("generations through the inference engine (temperature 0.8, top-k 40, latent KV cache)")
    engine = Engine(model, tokenizer=tok)
    t = time.perf_counter()
    results = engine.generate(list(SHAKESPEARE_PROMPTS),
                              [SamplingParams(max_new_tokens=80 if not q else 10, temperature=0.8, top_k=40,
                                              seed=seed + i) for i in range(len(SHAKESPEARE_PROMPTS))])
    gen_s = time.perf_counter() - t
    gens = []
    for prompt, res in zip(SHAKESPEARE_PROMPTS, results):
        gens.append(prompt + res.text)
        print(f"--- prompt {prompt!r}\n{prompt + res.text}\n")
    n_new = sum(r.completion_tokens for r in results)
    print(f"({n_new} tokens for {len(results)} prompts in one batch, {n_new / gen_s:.0f} tok/s)")

    # 4. SFT on synthetic tasks ----------------------------------------------------------------------------------
    _section(f"4. SFT on synthetic arithmetic and word problems ({sft_steps} steps)")
    levels = (1, 2)
    train_problems = gen_problems(3000 if not q else 200, seed=seed, tasks=TASKS, levels=levels)
    seen = {p.prompt for p in train_problems}
    test_problems = gen_problems(200 if not q else 20, seed=seed + 1000, tasks=TASKS, levels=levels, exclude=seen)
    write_chat_jsonl(train_problems, out / "sft_train.jsonl")
    test_file = out / "arith_test.jsonl"
    test_file.write_text("".join(json.dumps({"problem": p.prompt, "answer": p.answer, "subject": p.task,
                                             "level": p.level}) + "\n" for p in test_problems))
    print(f"{len(train_problems)} training problems (levels {levels}, tasks {', '.join(TASKS)}), e.g.\n"
          f"  user: {train_problems[7].prompt}\n  assistant: {train_problems[7].solution}\n"
          f"{len(test_problems)} held-out test problems (prompts not in the training set), graded by moonlet.eval")
    before = evaluate(task="arith", model=model, tokenizer=tok, data=test_file, limit=40 if not q else 5,
                      progress=False)
    print(f"accuracy before SFT (first {before['metrics']['n_items']} test problems): "
          f"{100 * before['metrics']['accuracy']:.1f}%")
    t = time.perf_counter()
    sft_opts = dict(init=str(out / "pretrain"), data=[str(out / "sft_train.jsonl")], out=str(out / "sft"),
                    steps=sft_steps, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=min(20, sft_steps // 5),
                    eval_interval=max(1, sft_steps // 5), log_interval=max(1, sft_steps // 25), seed=seed,
                    val_fraction=0.05)
    sft = run_training(sft_opts, mode="sft", progress=False)
    timings["sft_s"] = time.perf_counter() - t
    sft_model = sft["trainer"].raw_model.eval()
    t = time.perf_counter()
    # the saved checkpoint, as a user would evaluate it: engine backend, per-item JSONL + report card
    after = evaluate(sft["checkpoint"], "arith", data=test_file, out=out / "eval" / "arith", progress=False,
                     overwrite=True)
    timings["eval_s"] = time.perf_counter() - t
    print(f"accuracy after SFT on {after['metrics']['n_items']} held-out problems: {100 * after['metrics']['accuracy']:.1f}% "
          f"(report card: {out / 'eval' / 'arith' / 'report.md'})")
    for name in ("by_level", "by_subject"):
        if after["metrics"].get(name):
            print(f"  {name.replace('_', ' ')}: " + ", ".join(f"{k}: {100 * v['accuracy']:.0f}%"
                                                          for k, v in after["metrics"][name].items()))
    val_after = validation_loss(sft_model, val_loader, None if not q else 2)
    print(f"Shakespeare validation loss after SFT: {val_after:.3f} (before {val:.3f})")
    chat_engine = Engine(sft_model, tokenizer=tok)
    questions = ["What is 3 + 4?", "Tom has 5 apples. He buys 2 more. How many apples does Tom have now?"]
    replies = chat_engine.generate([tok.apply_chat_template([{"role": "user", "content": q_}]) for q_ in questions],
                                   SamplingParams(max_new_tokens=48))
    chat = list(zip(questions, [r.text for r in replies]))
    for q_, r in chat:
        print(f"chat: user {q_!r} -> assistant {r!r}")

    # summary -------------------------------------------------------------------------------------------------
    timings["total_s"] = time.perf_counter() - t_start
    summary = {
        "val_loss": val, "val_ppl": math.exp(val), "unigram_entropy": uni_h, "unigram_val_ce": uni_ce,
        "pretrain_tokens": pre["tokens"], "pretrain_tokens_per_s": pre["tokens_per_s"], "pretrain_steps": pre["step"],
        "eval_perplexity": ppl["perplexity"], "eval_bits_per_byte": ppl["bits_per_byte"],
        "sft_accuracy": after["metrics"]["accuracy"], "accuracy_before_sft": before["metrics"]["accuracy"],
        "generation_tokens_per_s": n_new / gen_s,
        "val_loss_after_sft": val_after, "generations": gens, "timings": timings,
        "pretrain_checkpoint": pre["checkpoint"], "sft_checkpoint": sft["checkpoint"],
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _section("summary")
    print(f"validation loss {val:.3f} nats/token (unigram entropy {uni_h:.3f}, unigram model on val {uni_ce:.3f}); "
          f"arithmetic accuracy {100 * before['metrics']['accuracy']:.0f}% -> "
          f"{100 * after['metrics']['accuracy']:.0f}% after SFT")
    print("time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items()))
    print(f"checkpoints: {pre['checkpoint']} (pretrained), {sft['checkpoint']} (SFT); curves: "
          f"{out / 'pretrain' / 'loss.png'}, {out / 'sft' / 'loss.png'}; summary: {out / 'summary.json'}")
    return 0
