"""The planner against DeepSeek-V3's published training figures, and its flag validation.

Published (V3 technical report, abstract and Table 1; ISCA '25 Table 2):
  250 GFLOPs per training token at 4K; 180K H800 GPU-hours per trillion tokens; 2,664K GPU-hours
  of pre-training for 14.8T tokens; $2 per GPU-hour -> $5.328M for pre-training (of $5.576M in total,
  which adds context extension and post-training).
Implied MFU: 250.46 GFLOP x 1e12 / (180e3 h x 3600 s x 989.4 TFLOP/s) = 39.1% of the H800's dense BF16
tensor peak (989.4 TFLOP/s; equivalently 19.5% of its dense FP8 peak). The test uses 39%.
"""

import json

import pytest

from moonlet.cli import main
from moonlet.config import preset
from moonlet.plan import (GPUS, PlanArgs, PlanError, activation_bytes, activation_elements_per_token_layer,
                          implied_mfu, plan)

V3_MFU = 0.39  # of the H800's dense BF16 peak, as derived in the module docstring


def v3_args(**kw) -> PlanArgs:
    base = dict(cfg=preset("deepseek-v3"), gpus=2048, gpu="h800", ep=64, seq=4096, global_batch=16384,
                mfu=V3_MFU, price=2.0, tokens=14.8e12, activation_checkpointing=True)
    base.update(kw)
    return PlanArgs(**base)


def test_v3_training_flops_per_token():
    p = plan(v3_args())
    assert abs(p.flops_per_token / 250e9 - 1) < 0.05


def test_v3_reproduces_published_gpu_hours_and_cost():
    p = plan(v3_args())
    assert GPUS["h800"].bf16_tflops == 989.4
    assert abs(p.gpu_hours_per_trillion / 180e3 - 1) < 0.05
    assert abs(p.gpu_hours / 2.664e6 - 1) < 0.05
    assert abs(p.cost / 5.328e6 - 1) < 0.05
    # "3.7 days per trillion tokens on 2048 H800s"
    assert abs(p.gpu_hours_per_trillion / 2048 / 24 / 3.7 - 1) < 0.05
    # the MFU the published figure implies, computed by the planner, is the 39% used above
    assert implied_mfu(preset("deepseek-v3"), 180e3, "h800") == pytest.approx(0.391, abs=0.001)
    assert implied_mfu(preset("deepseek-v3"), 180e3, "h800", precision="fp8") == pytest.approx(0.195, abs=0.001)


def test_time_scales_as_expected():
    a = plan(v3_args())
    b = plan(v3_args(mfu=V3_MFU / 2))
    assert b.gpu_hours == pytest.approx(2 * a.gpu_hours)
    c = plan(v3_args(gpu="b200"))  # 2.27x the dense BF16 peak: fewer GPU-hours at the same MFU
    assert c.gpu_hours == pytest.approx(a.gpu_hours * 989.4 / 2250)
    # GPU-hours do not depend on the cluster size; days do
    d = plan(v3_args(gpus=1024, global_batch=8192))
    assert d.gpu_hours == pytest.approx(a.gpu_hours) and d.days == pytest.approx(2 * a.days)


def test_memory_per_rank():
    cfg = preset("deepseek-v3")
    p = plan(v3_args())
    P = 671_026_419_200
    assert p.memory["weights"] == pytest.approx(4 * P / 2048)
    assert p.memory["gradients"] == pytest.approx(4 * P / 2048)
    assert p.memory["optimizer"] == pytest.approx(8 * P / 2048)  # AdamW m and v in fp32
    assert plan(v3_args(optimizer="muon")).memory["optimizer"] < 0.55 * p.memory["optimizer"]
    # halving the shard group (HSDP with 2 replicas) doubles the per-rank states
    h = plan(v3_args(dp_shard=1024))
    assert h.memory["weights"] == pytest.approx(2 * p.memory["weights"]) and h.dp_replicate == 2
    # activation checkpointing keeps only block inputs (+ one block during recompute)
    no_ac = plan(v3_args(activation_checkpointing=False))
    assert no_ac.memory["activations"] > 10 * p.memory["activations"]
    # block inputs of 61 layers in bf16 + the biggest block's saved activations during its recompute
    biggest = max(activation_elements_per_token_layer(cfg, moe)["total"] for moe in (False, True))
    assert p.memory["activations"] == pytest.approx(4096 * 7168 * 2 * 61 + 4096 * biggest * 2)
    assert no_ac.memory["activations"] == pytest.approx(activation_bytes(cfg, 4096, False)["blocks"])
    assert p.fits and not no_ac.fits


def test_all_to_all_bytes():
    cfg = preset("deepseek-v3")
    p = plan(v3_args(activation_checkpointing=False))
    tokens_per_rank = 16384 * 4096 / 2048
    # 58 MoE layers x tokens x top-8 x 7168 x (2 B dispatch + 2 B combine) x 63/64 off-rank x (fwd + bwd)
    expected = 58 * tokens_per_rank * 8 * 7168 * 4 * 63 / 64 * 2
    assert p.all_to_all_bytes_per_step == pytest.approx(expected)
    assert plan(v3_args(activation_checkpointing=False, dispatch_dtype="fp8")).all_to_all_bytes_per_step == \
        pytest.approx(expected * 3 / 4)
    assert plan(v3_args(ep=1)).all_to_all_bytes_per_step == 0
    assert cfg.n_routed_experts == 256


@pytest.mark.parametrize("kw,msg", [
    (dict(ep=3), "n_routed_experts (256) must be divisible by --ep (3)"),
    (dict(gpus=2000, dp_shard=2048), "--gpus (2000) must be divisible by --dp-shard (2048)"),
    (dict(dp_shard=32, ep=64), "--dp-shard (32) must be divisible by --ep (64)"),
    (dict(global_batch=15360), "--global-batch (15360) must be divisible by data-parallel ranks x --micro-batch"),
    (dict(mfu=0.0), "--mfu must be in (0, 1]"),
    (dict(gpu="a100"), "--gpu 'a100' is not one of"),
    (dict(seq=200_000), "--seq (200000) exceeds max_position_embeddings"),
])
def test_bad_flags(kw, msg):
    with pytest.raises(PlanError) as e:
        plan(v3_args(**kw))
    assert msg in str(e.value)


def test_dense_model_rejects_ep():
    with pytest.raises(PlanError, match="needs a MoE config"):
        plan(PlanArgs(cfg=preset("tiny").replace(n_routed_experts=None), gpus=8, ep=2, global_batch=8))


def test_cli(capsys):
    argv = ["plan", "deepseek-v3", "--gpus", "2048", "--gpu", "h800", "--ep", "64", "--seq", "4096",
            "--global-batch", "16384", "--mfu", "0.39", "--tokens", "14.8T", "--activation-checkpointing"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "all-to-all" in out and "fits" in out
    assert main(argv + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert abs(d["gpu_hours"] / 2.664e6 - 1) < 0.05
    assert main(["plan", "deepseek-v3", "--gpus", "8", "--ep", "3", "--global-batch", "8"]) == 1
    err = capsys.readouterr().err
    assert "n_routed_experts (256) must be divisible by --ep (3)" in err and len(err.strip().splitlines()) == 1
