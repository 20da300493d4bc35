"""moonlet.dist on CPU/gloo: FSDP2 and expert parallelism reproduce one-process training.

The ranks run in processes started here (torchrun, 4 then 2 ranks; one launch per world size, all
scenarios of that size share its process group), every launch bounded by a timeout. The one-process
references run in this process on the same global batch. "Same" = per step the loss and the
pre-clip gradient norm within 1e-5 relative, the global expert loads exactly equal (so the
balancing-bias updates are identical), and every final tensor within 1e-5 relative (Frobenius
norm of the difference over the norm of the reference: AdamW's normalized update turns summation-
order noise in a near-zero gradient entry into an O(lr * 1e-3) change of that one entry, so
elementwise relative error is not a meaningful bar; the Frobenius one is).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _dist_common import (  # noqa: E402
    SCENARIOS, STEPS, Reductions, make_batches, make_model, make_optimizers, tiny_cfg, train_steps,
)

from moonlet.config import preset  # noqa: E402
from moonlet.dist import ParallelismError, max_ranks_per_token, validate_parallelism  # noqa: E402

HERE = Path(__file__).parent
WORKER = HERE / "_dist_worker.py"
SRC = HERE.parent / "src"
REL = 1e-5


# ---- validation (no processes) -----------------------------------------------------------------------
def test_layout_validation_messages():
    cfg = preset("small")  # 16 routed experts
    with pytest.raises(ParallelismError, match=r"n_routed_experts \(16\) is not divisible by ep \(3\)"):
        validate_parallelism(cfg, 6, 2, 3)
    with pytest.raises(ParallelismError, match=r"dp_shard \(3\) x ep \(1\) = 3 does not match the world size \(4\)"):
        validate_parallelism(cfg, 4, 3, 1)
    with pytest.raises(ParallelismError, match=r"model is dense"):
        validate_parallelism(cfg.replace(n_routed_experts=None), 2, 1, 2)
    with pytest.raises(ParallelismError, match=r"ep must be a positive integer"):
        validate_parallelism(cfg, 2, 2, 0)
    validate_parallelism(cfg, 8, 2, 4)


def test_clear_errors_before_any_collective(tmp_path):
    from moonlet.dist import build_mesh, load_distributed
    from moonlet.interop.hf import CheckpointError

    with pytest.raises(CheckpointError, match="is not a distributed checkpoint"):
        load_distributed(tmp_path / "nope", torch.nn.Linear(2, 2))
    if not torch.distributed.is_initialized():
        with pytest.raises(ParallelismError, match="call init_distributed"):
            build_mesh(2, 1)


def test_node_limited_routing_bound_matches_deepseek_v3():
    # V3: 256 experts in 8 groups, topk_group 4: with one group per EP rank (node) a token reaches
    # at most 4 of them -- the published "each token is sent to at most M = 4 nodes".
    v3 = preset("deepseek-v3")
    assert max_ranks_per_token(v3, 8) == 4
    assert max_ranks_per_token(v3, 64) == 8  # 8 ranks per group: the K = 8 experts bound it instead
    assert max_ranks_per_token(tiny_cfg(), 4) == 2 and max_ranks_per_token(tiny_cfg(), 2) == 2


# ---- spawned runs -----------------------------------------------------------------------------------
def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
    """Run a process group with a hard timeout (the whole group is killed on expiry)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd[-4:])} did not finish in {timeout}s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, None)


def _torchrun(n: int, out: Path, names: list[str], timeout: float = 150) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(WORKER), str(out), *names]
    r = _run(cmd, timeout, _env(MOONLET_DIST_TIMEOUT="60"))
    if r.returncode != 0:
        pytest.fail(f"{n}-rank run failed (exit {r.returncode}):\n{r.stdout[-4000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    t0 = time.perf_counter()
    _torchrun(4, out, [s.name for s in SCENARIOS if s.ranks == 4])
    _torchrun(2, out, [s.name for s in SCENARIOS if s.ranks == 2])  # resumes the 4-rank checkpoint
    print(f"spawned runs: {time.perf_counter() - t0:.1f}s")
    return out


@pytest.fixture(scope="module")
def refs() -> dict:
    """One-process references on the global batch: AdamW, AdamW with skewed routing, MuonClip."""
    cfg = tiny_cfg()
    batches = make_batches(cfg, STEPS + 2)
    out = {}
    for key, kind, skew, n in (("adamw", "adamw", False, STEPS), ("adamw_skew", "adamw", True, STEPS),
                               ("muon", "muon", False, STEPS + 2)):
        model = make_model(cfg, skew=skew)
        opts = make_optimizers(model, kind)
        h = train_steps(model, batches, opts, range(STEPS), Reductions(), muonclip=kind == "muon")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if n > STEPS:
            h2 = train_steps(model, batches, opts, range(STEPS, n), Reductions(), muonclip=True)
            out[key + "_late"] = (h2, {k: v.clone() for k, v in model.state_dict().items()})
        out[key] = (h, state)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _check_same(got: dict, ref_hist, ref_state: dict, loss_rel: float = REL, state_rel: float = REL) -> None:
    for step, (l, r) in enumerate(zip(got["losses"], ref_hist.losses)):
        assert abs(l - r) <= loss_rel * abs(r), f"step {step}: loss {l} vs one-process {r}"
    if state_rel > REL:  # bf16: only the losses are meaningful
        return
    for step, (n, r) in enumerate(zip(got["norms"], ref_hist.norms)):
        assert abs(n - r) <= REL * r, f"step {step}: grad norm {n} vs one-process {r}"
    assert got["global_load"] == ref_hist.global_load, "global expert loads differ: bias updates would diverge"
    assert set(got["state"]) == set(ref_state)
    worst = max(((_rel(got["state"][k], v), k) for k, v in ref_state.items()), key=lambda t: t[0])
    assert worst[0] <= state_rel, f"{worst[1]}: relative difference {worst[0]:.2e} after the steps"


REF_OF = {"adamw": "adamw", "muon": "muon"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp4_adamw", "fsdp4_muon", "ep2x2_muon", "ep4_adamw_skew", "fsdp2_muon", "ep2_adamw"])
def test_sharded_training_matches_one_process(runs, refs, name):
    sc = next(s for s in SCENARIOS if s.name == name)
    got = torch.load(runs / f"{name}.pt", weights_only=False)
    hist, state = refs[REF_OF[sc.optim] + ("_skew" if sc.skew else "")]
    _check_same(got, hist, state)
    if sc.ep > 1:  # node-limited routing: no token was sent to more EP ranks than its groups allow
        assert got["max_ranks_per_token"] and max(got["max_ranks_per_token"]) <= got["bound"]


@pytest.mark.slow
def test_skewed_routing_leaves_experts_and_a_rank_idle(runs):
    got = torch.load(runs / "ep4_adamw_skew.pt", weights_only=False)
    for load in got["global_load"]:  # experts 6, 7 = all of EP rank 3's experts: no tokens at all
        assert load[6] == load[7] == 0 and load[0] > 0


@pytest.mark.slow
def test_muonclip_reference_actually_clips(refs):
    # the Muon scenarios include QK-clip; make sure it changed something (else it is untested)
    cfg = tiny_cfg()
    model = make_model(cfg)
    train_steps(model, make_batches(cfg, STEPS), make_optimizers(model, "muon"), range(STEPS), Reductions(),
                muonclip=False)
    clipped = refs["muon"][1]
    k = "model.layers.0.self_attn.q_b_proj.weight"
    assert _rel(model.state_dict()[k], clipped[k]) > 1e-3


@pytest.mark.slow
def test_resume_on_two_ranks_from_four_rank_checkpoint(runs, refs):
    # saved on 4 ranks as dp_shard 2 x ep 2 after 3 steps, resumed on 2 ranks as plain FSDP
    got = torch.load(runs / "resume2_from_ep2x2.pt", weights_only=False)
    hist, state = refs["muon_late"]
    _check_same(got, hist, state)


@pytest.mark.slow
def test_consolidated_hf_export_from_distributed_run(runs, refs):
    from moonlet.interop.hf import from_pretrained

    model = from_pretrained(runs / "ep2x2_muon_hf")
    ref_state = refs["muon"][1]
    got = model.state_dict()
    for k, v in ref_state.items():
        assert _rel(got[k], v) <= REL, k


@pytest.mark.slow
def test_bf16_mixed_precision_tracks_fp32(runs, refs):
    got = torch.load(runs / "ep2_bf16.pt", weights_only=False)
    hist, state = refs["adamw"]
    _check_same(got, hist, state, loss_rel=1e-2, state_rel=1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(tmp_path: Path, mode: str, timeout_s: int) -> tuple[list[subprocess.Popen], list[str], float]:
    """Two ranks started like torchrun would (env://), without torchrun's own clean-up of the survivors."""
    port, procs = _free_port(), []
    t0 = time.perf_counter()
    for rank in range(2):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), MOONLET_DIST_TIMEOUT=str(timeout_s))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    try:
        out0 = procs[0].communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        out0 = None
    elapsed = time.perf_counter() - t0
    for q in procs:  # the stalled rank is still asleep: end it
        if q.poll() is None:
            os.killpg(q.pid, signal.SIGKILL)
        q.communicate()
    if out0 is None:
        pytest.fail(f"rank 0 hung after its peer {'died' if mode == 'die' else 'stalled'}")
    return procs, [out0], elapsed


@pytest.mark.slow
def test_dead_rank_makes_the_others_exit_with_a_clear_error(tmp_path):
    procs, (out0,), elapsed = _launch_pair(tmp_path, "die", timeout_s=60)
    assert procs[1].returncode == 17  # the one that died
    assert procs[0].returncode == 1, out0[-2000:]
    assert "moonlet.dist: rank 0 of 2 is exiting: a collective failed or timed out" in out0, out0[-2000:]
    assert "finished without noticing" not in out0
    assert elapsed < 45  # gloo sees the closed connection at once; it does not wait for the timeout


@pytest.mark.slow
def test_stalled_rank_trips_the_process_group_timeout(tmp_path):
    procs, (out0,), elapsed = _launch_pair(tmp_path, "stall", timeout_s=4)
    assert procs[0].returncode == 1, out0[-2000:]
    assert "moonlet.dist: rank 0 of 2 is exiting: a collective failed or timed out" in out0, out0[-2000:]
    assert "Timed out" in out0 or "timed out" in out0.split("Cause:")[-1]
    assert elapsed < 60


@pytest.mark.slow
def test_selfcheck_command_under_torchrun():
    # the documented cluster smoke test, on the `tiny` preset (4 layers, groups, MTP), EP 2 + checkpointing
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "moonlet.dist.selfcheck", "--ep", "2", "--batch-per-rank", "1", "--seq", "32",
           "--activation-checkpointing"]
    r = _run(cmd, 120, _env())
    assert r.returncode == 0, r.stdout[-3000:]
    assert "OK: loss, gradient norm and every gradient match one process" in r.stdout
