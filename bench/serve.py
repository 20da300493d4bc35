"""Server throughput and latency: 1 (sequential), 4 and 16 concurrent streaming clients.

    PYTHONPATH=src python bench/serve.py                      # random `tiny` preset, built in a temp dir
    PYTHONPATH=src python bench/serve.py --checkpoint runs/demo/sft --max-tokens 128 --json out.json

Starts `moonlet serve` in a subprocess (so the clients' HTTP/JSON work does not share the server's
GIL), then for each concurrency level c sends max(`--requests`, 2c) chat requests, c at a time, each a
different prompt, streaming, greedy, `ignore_eos` so every request generates exactly --max-tokens.
Reports per level: generated tokens/s over the wall time, time to first token p50/p95 (request sent ->
first content chunk), request latency p50, and the throughput ratio to sequential (c = 1). The
issue's target: >= 3x sequential throughput at 16 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def build_tiny(dir_: Path, seed: int = 0) -> Path:
    """The `tiny` preset with random weights + a 4096-token BPE trained on a few bundled works."""
    import moonlet
    from moonlet.config import preset
    from moonlet.data.corpus import bundled_documents
    from moonlet.data.tokenizer import train_tokenizer

    cfg = preset("tiny")
    moonlet.CausalLM(cfg).init_weights(seed=seed).save_pretrained(dir_)
    train_tokenizer(bundled_documents("train")[:4], vocab_size=cfg.vocab_size).save(dir_)
    return dir_


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, usage = None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    return {"ttft": ttft if ttft is not None else float("nan"), "latency": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"]}


def run_level(url: str, model: str, clients: int, n_requests: int, max_tokens: int, offset: int) -> dict:
    prompts = [f"Request {offset + i}: tell me about the play number {i % 37} and its king." for i in range(n_requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as ex:
        results = list(ex.map(lambda p: one_request(url, model, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts, lats = [r["ttft"] for r in results], [r["latency"] for r in results]
    return {"clients": clients, "requests": n_requests, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
            "latency_p50_s": statistics.median(lats)}


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: a random `tiny` preset in a temp dir)")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels (1 = sequential)")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least 2x the clients)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else build_tiny(Path(tmp) / "tiny")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "moonlet", "serve", str(ckpt), "--port", str(port), "--model-name", "bench",
               "--max-batch", str(args.max_batch), "--max-queue", "256", "--log-level", "warning"]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)
            one_request(url, "bench", "warm up", 8)  # first-call costs out of the numbers
            rows, offset = [], 0
            load0 = loadavg()
            for c in levels:
                n = max(args.requests, 2 * c)
                rows.append(run_level(url, "bench", c, n, args.max_tokens, offset))
                offset += n
                r = rows[-1]
                print(f"clients {c:>3}: {r['tokens_per_s']:8.1f} tok/s  ttft p50 {r['ttft_p50_s'] * 1e3:7.0f} ms  "
                      f"p95 {r['ttft_p95_s'] * 1e3:7.0f} ms  latency p50 {r['latency_p50_s']:.2f} s  "
                      f"({r['requests']} requests, {r['wall_s']:.1f} s)", flush=True)
        finally:
            server.terminate()
            server.wait(60)
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), rows[0]["tokens_per_s"])
    for r in rows:
        r["vs_sequential"] = r["tokens_per_s"] / base
    out = {"checkpoint": str(args.checkpoint or "random tiny preset"), "max_tokens": args.max_tokens,
           "max_batch": args.max_batch, "dtype": args.dtype or "checkpoint", "threads": os.environ.get("OMP_NUM_THREADS"),
           "loadavg_before": load0, "loadavg_after": loadavg(), "levels": rows}
    print("\n| clients | requests | tokens/s | vs sequential | TTFT p50 (ms) | TTFT p95 (ms) | latency p50 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['vs_sequential']:.2f}x | "
              f"{r['ttft_p50_s'] * 1e3:.0f} | {r['ttft_p95_s'] * 1e3:.0f} | {r['latency_p50_s']:.2f} |")
    print(f"load average (1/5/15 min) before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
