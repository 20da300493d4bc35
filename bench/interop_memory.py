"""Peak memory of loading and converting a checkpoint, against the model's own size (same run).

    PYTHONPATH=src python bench/interop_memory.py [--preset small]

Saves a random `--preset` model (float32, 100 MB shards) to a temp dir, then in a fresh process each:
  load fp32      moonlet.from_pretrained(dir)                       (reference: fp32 model bytes)
  load bf16      moonlet.from_pretrained(dir, dtype="bf16")         (reference: bf16 model bytes)
  convert bf16   convert_checkpoint(dir, out, dtype=bf16, 50 MB shards)  (reference: one shard)
and samples the process's anonymous RSS (file-backed safetensors mmap pages are not counted: they
are page cache the kernel can drop). Prints peak-above-baseline and its ratio to the reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import gc, json, sys, threading, time
import moonlet
from moonlet.interop import convert_checkpoint
def anon_mb():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) / 1024
mode, src, out = sys.argv[1:4]
moonlet.from_pretrained("tiny"); gc.collect()   # imports and one-time meta-device warm-up out of the baseline
base, peak, stop = anon_mb(), [0.0], [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], anon_mb()); time.sleep(0.002)
th = threading.Thread(target=sample, daemon=True); th.start()
t = time.perf_counter()
if mode == "load_fp32":
    m = moonlet.from_pretrained(src)
elif mode == "load_bf16":
    m = moonlet.from_pretrained(src, dtype="bf16")
else:
    convert_checkpoint(src, out, dtype="bf16", max_shard_size="50MB", overwrite=True)
secs = time.perf_counter() - t
stop[0] = True; th.join()
print(json.dumps({"peak_mb": peak[0] - base, "seconds": secs}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    import moonlet

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "ck", Path(tmp) / "out"
        model = moonlet.from_pretrained(args.preset, seed=0)
        n = sum(t.numel() for t in model.state_dict().values())
        model.save_pretrained(src, max_shard_size="100MB")
        del model
        refs = {"load_fp32": n * 4 / 2**20, "load_bf16": n * 2 / 2**20, "convert_bf16": 50e6 / 2**20}
        print(f"preset {args.preset}: {n / 1e6:.1f}M parameters in the checkpoint (MTP included)")
        print(f"{'mode':<14}{'peak MB':>10}{'reference MB':>14}{'ratio':>8}{'seconds':>9}")
        for mode, ref in refs.items():
            r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)], capture_output=True,
                               text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{mode:<14}{res['peak_mb']:>10.0f}{ref:>14.0f}{res['peak_mb'] / ref:>8.2f}{res['seconds']:>9.2f}")


if __name__ == "__main__":
    main()
