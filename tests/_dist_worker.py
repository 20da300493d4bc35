"""One rank of the distributed tests (launched by torchrun, or directly with RANK/WORLD_SIZE set).

usage: _dist_worker.py OUT_DIR SCENARIO [SCENARIO ...]   (names from _dist_common.SCENARIOS, or "die")
Rank 0 writes OUT_DIR/<scenario>.pt with the losses, grad norms, global loads and the full final
state dict; the test compares them with one-process references.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from _dist_common import SCENARIOS, Reductions, make_batches, make_model, make_optimizers, tiny_cfg, train_steps  # noqa: E402

from moonlet import dist as mdist  # noqa: E402
from moonlet.model import CausalLM  # noqa: E402


def run_scenario(sc, out: Path, env: mdist.DistEnv) -> None:
    cfg = tiny_cfg()
    mesh = mdist.build_mesh(sc.dp_shard, sc.ep, cfg)
    if sc.resume:  # what a big model needs: no full copy on any rank, weights come from the checkpoint
        with torch.device("meta"):
            model = CausalLM(cfg).train()
        model.set_balance_alpha(0.01)
    else:
        model = make_model(cfg, skew=sc.skew)
    mdist.parallelize(model, mesh, activation_checkpointing=sc.ac,
                      mixed_precision=torch.bfloat16 if sc.mixed else None)
    if sc.resume:
        model.to_empty(device=env.device)
        model.model.rotary.reset_parameters()  # non-persistent buffer
    opts = make_optimizers(model, sc.optim, orthogonalize=mdist.orthogonalize_sharded, foreach=sc.foreach)
    start = sc.start
    if sc.resume:
        extra = mdist.load_distributed(out / sc.resume, model, opts)
        assert extra["step"] == sc.start, extra
    batches = [(mdist.shard_batch(i, mesh), mdist.shard_batch(l, mesh)) for i, l in make_batches(cfg, start + sc.steps)]
    red = Reductions(
        clip=mdist.clip_grad_norm_,
        loads=lambda loads: mdist.all_reduce_expert_load(loads, mesh),
        max=lambda xs: mdist.all_reduce_max(xs, mesh),
        loss=lambda x: mdist.mean_across_ranks(x, mesh),
        scale_rows=mdist.scale_rows_,
    )
    t0 = time.perf_counter()
    h = train_steps(model, batches, opts, range(start, start + sc.steps), red, muonclip=sc.optim == "muon")
    dt = time.perf_counter() - t0
    max_ranks = []
    for moe in model.moe_layers():
        if isinstance(moe.experts, mdist.ExpertParallelExperts):
            max_ranks.append(int(moe.experts.last_max_ranks_per_token))
    if sc.save:
        mdist.save_distributed(out / sc.save, model, opts, extra={"step": start + sc.steps})
    if sc.export:
        mdist.export_hf(model, out / f"{sc.name}_hf")
    state = mdist.full_state_dict(model)
    if env.is_main:
        torch.save({"losses": h.losses, "norms": h.norms, "global_load": h.global_load, "state": state,
                    "max_ranks_per_token": max_ranks, "bound": mdist.max_ranks_per_token(cfg, sc.ep),
                    "seconds": dt}, out / f"{sc.name}.pt")


def die(env: mdist.DistEnv, stall: bool) -> None:
    """Rank 1 dies abruptly (or stalls) mid-training; rank 0 must exit with a clear error, not hang."""
    cfg = tiny_cfg()
    mesh = mdist.build_mesh(None, 2, cfg)
    model = mdist.parallelize(make_model(cfg), mesh)
    ids, labels = make_batches(cfg, 1)[0]
    ids, labels = mdist.shard_batch(ids, mesh), mdist.shard_batch(labels, mesh)
    model(ids, labels).loss.backward()
    if env.rank == 1:
        if stall:
            time.sleep(300)
        os._exit(17)
    for _ in range(3):
        model(ids, labels).loss.backward()
    print("rank 0 finished without noticing the dead peer", flush=True)


def main() -> None:
    t_start = time.perf_counter()
    out, names = Path(sys.argv[1]), sys.argv[2:]
    timeout = float(os.environ.get("MOONLET_DIST_TIMEOUT", "60"))
    with mdist.exit_on_failure():
        env = mdist.init_distributed(timeout_s=timeout)
        if names in (["die"], ["stall"]):
            die(env, stall=names == ["stall"])
            return
        by_name = {s.name: s for s in SCENARIOS}
        if env.is_main:
            print(f"rank 0 ready after {time.perf_counter() - t_start:.1f}s", flush=True)
        for n in names:
            t0 = time.perf_counter()
            run_scenario(by_name[n], out, env)
            if env.is_main:
                print(f"{n}: {time.perf_counter() - t0:.1f}s", flush=True)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
