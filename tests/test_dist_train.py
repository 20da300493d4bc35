"""`torchrun ... -m moonlet train` (CPU, gloo, 2 processes) against the one-process run of the same
global batch: `-b 4` on one process vs `-b 2` on each of 2 processes reads the same rows per step.

What is pinned (references: the one-process run of the same CLI command, itself covered by
tests/test_trainer.py and tests/test_optim.py):
  * FSDP2 (dp_shard 2) + AdamW, fp32: per-step loss, gradient norm and final val loss within 1e-5
    relative; the consolidated export at the end has the one-process weights (Frobenius 1e-5) and
    loads into transformers' DeepseekV3 with the same logits;
  * expert parallel (ep 2, activation checkpointing: the recomputation replays the all-to-alls) +
    MuonClip with a tau low enough to clip heads: within 5e-4 relative
    (measured: loss 2e-5, grad norm 1e-4 over 4 steps). Muon's Newton-Schulz runs in bfloat16, and
    summation-order noise in the fp32 gradient flips the odd bf16 rounding of the gathered update;
    with float32 Newton-Schulz the same runs agree to 3e-7 (docs/LOG.md);
  * an intermediate checkpoint (shards only) consolidated by `python -m moonlet.dist.export` has the
    one-process run's step-2 weights;
  * the 2-process runs' step-2 checkpoints (DCP shards only) resumed on ONE process continue with
    the 2-process runs' losses (AdamW 1e-5, Muon 5e-4: one process sums the gradient in another order);
  * the one-process AdamW run's step-2 checkpoint resumed on 2 processes (its optimizer state sliced
    to the shards) continues with the one-process losses;
  * bad layout flags exit 1 with one clear line (one process and under torchrun).
All launches are bounded by timeouts; the four torchrun launches run concurrently.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moonlet.cli import main
from moonlet.data.corpus import bundled_documents
from moonlet.data.tokenizer import train_tokenizer
from moonlet.train.checkpoint import has_distributed_state, list_checkpoints, load_model

pytestmark = pytest.mark.slow

SRC = Path(__file__).parent.parent / "src"
MICRO = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256)
STEPS = 4
TIMEOUT = 420  # per launch; they normally take 30-60 s on 2 loaded cores


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _common(d: Path, optimizer: str, sets: dict | None = None) -> list[str]:
    sets = {**MICRO, **(sets or {})}
    return ["--preset", "tiny", "--set", *[f"{k}={json.dumps(v)}" for k, v in sets.items()],
            "--tokenizer", str(d / "tok"), "--data", str(d / "train.txt"), "--val-data", str(d / "val.txt"),
            "--steps", str(STEPS), "--seq-len", "32", "--optimizer", optimizer, "--lr", "1e-2", "--warmup-steps", "1",
            "--log-interval", "1", "--eval-interval", "0", "--eval-batches", "2", "--bias-update-gamma", "1e-2",
            "--balance-alpha", "1e-3", "--qk-clip-tau", "0.05", "--save-interval", "2", "--keep-last", "0"]


class Launch:
    """torchrun --standalone --nproc-per-node N -m moonlet train ARGS, in its own process group."""

    def __init__(self, n: int, args: list[str], log: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", MOONLET_DIST_TIMEOUT="120",
                   PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        self.log = log
        self.f = open(log, "w")
        self.p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc-per-node={n}", "-m", "moonlet", "train", *args],
                                  stdout=self.f, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self) -> tuple[int, str]:
        try:
            self.p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
            pytest.fail(f"torchrun did not finish in {TIMEOUT}s:\n{self.log.read_text()[-3000:]}")
        finally:
            self.f.close()
        return self.p.returncode, self.log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_train")
    docs = bundled_documents("val")
    train_tokenizer(docs[:1], vocab_size=400).save(d / "tok")
    (d / "train.txt").write_text(docs[0][:40_000])
    (d / "val.txt").write_text(docs[1][:6_000])
    launches = {
        "adamw2": Launch(2, [*_common(d, "adamw"), "-b", "2", "--dp-shard", "2", "--out", str(d / "adamw2")],
                         d / "adamw2.log"),
        "muon2": Launch(2, [*_common(d, "muonclip"), "-b", "2", "--ep", "2", "--activation-checkpointing",
                            "--out", str(d / "muon2")], d / "muon2.log"),
        "bad_ep": Launch(2, [*_common(d, "adamw", dict(n_routed_experts=3, n_group=1)), "-b", "2", "--ep", "2",
                             "--out", str(d / "bad")], d / "bad.log"),
    }
    # the one-process references run here meanwhile; the AdamW one's step-2 checkpoint is then
    # resumed on 2 processes (scale-out: its optimizer state is sliced to the shards)
    assert main(["train", *_common(d, "adamw"), "-b", "4", "--out", str(d / "adamw1")]) == 0
    _link_checkpoint(d / "adamw1", d / "scale_out", 2)
    launches["scale_out"] = Launch(2, ["--out", str(d / "scale_out"), "--resume"], d / "scale_out.log")
    assert main(["train", *_common(d, "muonclip"), "-b", "4", "--out", str(d / "muon1")]) == 0
    return d, {k: v.wait() for k, v in launches.items()}


def _link_checkpoint(src_run: Path, run: Path, step: int) -> Path:
    """A new run directory whose only checkpoint is `src_run`'s step `step` (a symlink)."""
    (run / "checkpoints").mkdir(parents=True)
    ckpt = src_run / "checkpoints" / f"step_{step:07d}"
    os.symlink(ckpt, run / "checkpoints" / ckpt.name)
    return ckpt


def _history(run: Path) -> list[dict]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] in ("train", "val")]


def _check_same(got: list[dict], ref: list[dict], rel: float, steps=None) -> None:
    pick = lambda h: [r for r in h if steps is None or r["step"] in steps]  # noqa: E731
    got, ref = pick(got), pick(ref)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in ref]
    for g, r in zip(got, ref):
        for key in ("loss", "ce", "grad_norm", "val_loss"):
            if key in r:
                assert abs(g[key] - r[key]) <= rel * abs(r[key]), (key, g, r)
        if "clipped_heads" in r:
            assert g["clipped_heads"] == r["clipped_heads"]


def _ok(runs, name):
    d, results = runs
    code, log = results[name]
    assert code == 0, log[-4000:]
    return d


def test_fsdp_adamw_matches_one_process_and_exports_hf(runs):
    d = _ok(runs, "adamw2")
    _check_same(_history(d / "adamw2"), _history(d / "adamw1"), 1e-5)
    # final checkpoint: shards + the consolidated HF export; equal to the one-process weights
    ckpt = list_checkpoints(d / "adamw2")[-1][1]
    assert has_distributed_state(ckpt) and (ckpt / "model.safetensors").exists()
    got, ref = load_model(d / "adamw2"), load_model(d / "adamw1")
    _assert_same_weights(got, ref)
    # transformers reads the export as an ordinary DeepseekV3 checkpoint
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(3, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = got.eval()(ids).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_expert_parallel_muonclip_matches_one_process(runs):
    d = _ok(runs, "muon2")
    hist = _history(d / "muon2")
    assert sum(r.get("clipped_heads", 0) for r in hist) > 0  # QK-clip ran on the sharded projections
    _check_same(hist, _history(d / "muon1"), 5e-4)


def _assert_same_weights(got, ref, rel=1e-5):
    for (name, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
        assert float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)) < rel, name


def test_intermediate_checkpoint_exports_to_the_one_process_weights(runs, tmp_path):
    from moonlet.dist.export import main as export_main

    d = _ok(runs, "adamw2")
    assert export_main([str(d / "adamw2" / "checkpoints" / "step_0000002"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    _assert_same_weights(load_model(tmp_path / "hf"), load_model(d / "adamw1" / "checkpoints" / "step_0000002"))


@pytest.mark.parametrize("name, rel", [("adamw2", 1e-5), ("muon2", 5e-4)])
def test_two_process_checkpoint_resumes_on_one_process(runs, capsys, name, rel):
    d = _ok(runs, name)
    run = d / f"{name}_resumed"
    step2 = _link_checkpoint(d / name, run, 2)
    assert has_distributed_state(step2) and not (step2 / "model.safetensors").exists()  # shards only
    # -b is derived from the saved global batch: 2 rows x 2 processes -> 4 rows on one process
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    _check_same(_history(run), _history(d / name), rel, steps=range(3, STEPS + 1))


def test_one_process_checkpoint_resumes_on_two_processes(runs):
    d = _ok(runs, "scale_out")
    assert not has_distributed_state(d / "adamw1" / "checkpoints" / "step_0000002")  # a plain checkpoint
    _check_same(_history(d / "scale_out"), _history(d / "adamw1"), 1e-5, steps=range(3, STEPS + 1))


def test_activation_checkpointing_on_one_process_changes_nothing(runs, tmp_path):
    d = _ok(runs, "adamw2")
    assert main(["train", *_common(d, "adamw"), "-b", "4", "--activation-checkpointing", "--out", str(tmp_path / "ac")]) == 0
    _check_same(_history(tmp_path / "ac"), _history(d / "adamw1"), 1e-6)


def test_layout_flag_errors_are_one_clear_line(runs, tmp_path, capsys):
    d, results = runs
    code, log = results["bad_ep"]
    assert code != 0 and "moonlet train: error: n_routed_experts (3) is not divisible by ep (2)" in log
    base = _common(d, "adamw") + ["--out", str(tmp_path / "x")]
    for flags, msg in ((["--ep", "2"], "--dp-shard 1 x --ep 2 = 2 processes, but this is a single process: "
                                       "launch with `torchrun --nproc-per-node 2"),
                       (["--ep", "0"], "--ep must be a positive integer, got 0")):
        assert main(["train", *base, *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moonlet train: error: ") and msg in err[0], err
