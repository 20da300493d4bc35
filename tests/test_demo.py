"""`moonlet demo --quick`: the whole path (tokenizer, pretraining, engine generations, eval-harness
scoring, SFT) runs end to end and writes its summary. Numbers from so few steps mean nothing; the
real demo's numbers are in bench/RESULTS.md."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "moonlet", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert len(s["generations"]) == 4 and all(g.strip() for g in s["generations"])
    assert 0.0 <= s["sft_accuracy"] <= 1.0 and s["eval_perplexity"] > 1.0
    assert (out / "eval" / "arith" / "report.md").exists() and (out / "eval" / "ppl" / "summary.json").exists()
    rows = [json.loads(l) for l in (out / "eval" / "arith" / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["verdict"] in ("pass", "fail") for r in rows)
