"""Decode step time at long context: DSA (top-k keys picked by the lightning indexer) vs dense MLA.

One model, two modes: the same DSA model's weights and cache run with `set_dsa_stage(model, "dense")`
(dense absorbed MLA, no indexer work at all) and `"sparse"` (indexer over every cached key, then
absorbed MLA over the top `index_topk` latent entries only). Each timed step is one new token through
`CausalLM.forward(ids [B, 1], positions=..., cache=..., last_only=True)` on a cache preallocated with
`allocate_cache` and filled with random latents / index keys up to the context length (a 16k-token
prefill would take far longer than the decode being measured and does not change a decode step's
cost; the selection depends on the values, its cost does not).

    python bench/dsa_decode.py                          # contexts 4k 8k 16k, batch 1, 1 thread
    python bench/dsa_decode.py --contexts 8192 16384 --batch 4 --threads 2
    python bench/dsa_decode.py --clock cpu              # process CPU time (a busy shared machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moonlet import accounting as acc  # noqa: E402
from moonlet.config import ModelConfig, preset  # noqa: E402
from moonlet.model import CausalLM, allocate_cache  # noqa: E402
from moonlet.model.sparse_attention import set_dsa_stage  # noqa: E402


def bench_config(topk: int, max_pos: int) -> ModelConfig:
    """A small V3.2-shaped model: attention wide enough that the O(context) part dominates a decode
    step at 16k (16 heads over a 256 + 32 latent), 8 index heads x 64, dense FFN, 4 layers."""
    return preset("tiny").replace(
        model_type="deepseek_v32", vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=16, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=None, num_nextn_predict_layers=0, max_position_embeddings=max_pos,
        index_n_heads=8, index_head_dim=64, index_topk=topk)


@torch.no_grad()
def time_decode(model: CausalLM, cache, ctx: int, batch: int, steps: int, warmup: int,
                clock=time.perf_counter) -> list[float]:
    """Seconds per decode step at `ctx` cached tokens (each step writes slot ctx, then is undone by the
    next one writing the same slot, so the context stays `ctx`)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 1))
    pos = torch.full((batch, 1), ctx, dtype=torch.int64)
    out = []
    for i in range(warmup + steps):
        t0 = clock()
        model(ids, positions=pos, cache=cache, last_only=True)
        if i >= warmup:
            out.append(clock() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 8192, 16384])
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = process CPU time (robust to time-slicing on a shared machine; use with 1 thread)")
    a = ap.parse_args()
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    max_ctx = max(a.contexts)
    cfg = bench_config(a.topk, max_ctx + 1)
    model = CausalLM(cfg).init_weights(seed=a.seed).eval()
    cache = allocate_cache(cfg, a.batch, max_ctx + 1, dtype=torch.float32, mtp=False)
    g = torch.Generator().manual_seed(a.seed)
    for c in cache:  # random "history": unit-RMS latents and LayerNorm'd-scale index keys
        c.latent.copy_(torch.randn(c.latent.shape, generator=g))
        c.index_keys.copy_(torch.randn(c.index_keys.shape, generator=g))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config: {n_params / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
          f"latent {cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}, indexer {cfg.index_n_heads}x{cfg.index_head_dim}, "
          f"top-{cfg.index_topk}; batch {a.batch}, fp32, {a.threads} thread(s), {a.clock} clock, {a.steps} timed steps "
          f"(median), load avg {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print("| context | dense MLA step (ms) | DSA step (ms) | speed-up | decode FLOPs/token dense -> DSA (MFLOP) | "
          "cache B/token dense -> DSA (fp32) |")
    print("|---|---|---|---|---|---|")
    dense_cfg = cfg.replace(model_type="deepseek_v3", index_n_heads=None, index_head_dim=None, index_topk=None)
    for ctx in a.contexts:
        res = {}
        for stage in ("dense", "sparse", "dense", "sparse"):  # interleaved: both see the same load drift
            set_dsa_stage(model, stage)
            res.setdefault(stage, []).extend(time_decode(model, cache, ctx, a.batch, a.steps // 2, a.warmup, clock))
        d, s = statistics.median(res["dense"]), statistics.median(res["sparse"])
        f_dsa = _decode_flops_dsa(cfg, ctx + 1)
        f_dense = _decode_flops_dense(dense_cfg, ctx + 1)
        print(f"| {ctx:,} | {d * 1e3:.2f} | {s * 1e3:.2f} | {d / s:.2f}x | {f_dense / 1e6:.1f} -> {f_dsa / 1e6:.1f} | "
              f"{acc.kv_cache_bytes_per_token(dense_cfg, 4):,} -> {acc.kv_cache_bytes_per_token(cfg, 4):,} |", flush=True)
    print(f"\nload avg at the end {os.getloadavg()[0]:.1f}")


def _decode_flops_dense(cfg: ModelConfig, keys: int) -> float:
    """Absorbed-form forward FLOPs of one token attending `keys` keys (accounting's per-token figure
    for a sequence whose mean context is `keys`: flops_per_token uses (seq_len + 1) / 2)."""
    return acc.flops_per_token(cfg, 2 * keys - 1, training=False, form="absorbed")


def _decode_flops_dsa(cfg: ModelConfig, keys: int) -> float:
    """DSA: attention over min(topk, keys) entries + the indexer over all `keys`."""
    from moonlet.model.sparse_attention import dsa_indexer_flops_per_token

    base = acc.flops_per_token(cfg.replace(model_type="deepseek_v3", index_n_heads=None, index_head_dim=None, index_topk=None), 2 * min(cfg.index_topk, keys) - 1,
                               training=False, form="absorbed")
    return base + cfg.num_hidden_layers * dsa_indexer_flops_per_token(cfg, keys)


if __name__ == "__main__":
    main()
