"""Trainer and checkpoints: exact resume, SIGKILL mid-save, corrupt checkpoints, non-finite steps,
Ctrl-C, the balance bias update, schedules, and the CLI end to end on a micro model."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moonlet.config import preset
from moonlet.data.corpus import bundled_documents
from moonlet.data.loader import PackedTextLoader, TokenStream
from moonlet.data.tokenizer import train_tokenizer
from moonlet.interop.hf import CheckpointError
from moonlet.model import CausalLM
from moonlet.model.moe import MoE
from moonlet.train.balance import imbalance, update_expert_bias_
from moonlet.train.checkpoint import (list_checkpoints, load_model, load_trainer_state, resolve_checkpoint,
                                      save_checkpoint)
from moonlet.train.schedule import lr_multiplier
from moonlet.train.trainer import TrainArgs, Trainer, TrainingDiverged

MICRO = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256)


@pytest.fixture(autouse=True)
def _one_thread():
    """The micro models here are all tiny matmuls: one thread is as fast on a quiet machine and
    avoids OpenMP spin-wait slowdowns (10x+) when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(bundled_documents("val")[:1], vocab_size=400)


@pytest.fixture(scope="module")
def streams(tok):
    docs = bundled_documents("val")
    return TokenStream.from_documents(tok, [docs[0][:60_000]]), TokenStream.from_documents(tok, [docs[1][:8_000]])


def _cfg(tok):
    return preset("tiny").replace(vocab_size=tok.vocab_size, **MICRO)


def _trainer(tok, streams, run_dir, model=None, extra_losses=None, **kw):
    args = TrainArgs(**{**dict(steps=6, batch_size=2, seq_len=32, grad_accum=2, optimizer="muonclip", lr=1e-2,
                               warmup_steps=2, eval_interval=0, eval_batches=2, log_interval=1, seed=0,
                               qk_clip_tau=0.02, bias_update_gamma=1e-2, balance_alpha=1e-3), **kw})
    model = model or CausalLM(_cfg(tok)).init_weights(seed=0)
    loader = PackedTextLoader(streams[0], args.batch_size, args.seq_len, seed=args.seed, mtp_depth=1)
    val = PackedTextLoader(streams[1], args.batch_size, args.seq_len, shuffle=False)
    return Trainer(model, args, loader, val, run_dir=run_dir, tokenizer=tok, progress=False,
                   print_fn=lambda *_: None, extra_losses=extra_losses)


def _losses(trainer):
    return [r["loss"] for r in trainer.history if r.get("kind") == "train"]


def test_resume_reproduces_the_uninterrupted_run_exactly(tok, streams, tmp_path):
    full = _trainer(tok, streams, tmp_path / "full")
    full.fit()
    assert any(r.get("clipped_heads") for r in full.history if r.get("kind") == "train")  # the clip was exercised
    half = _trainer(tok, streams, tmp_path / "half", steps=3)
    half.fit()
    ckpt = resolve_checkpoint(tmp_path / "half")
    assert ckpt.name == "step_0000003"
    resumed = _trainer(tok, streams, tmp_path / "half", model=load_model(ckpt).float().train())
    resumed.resume(ckpt)
    assert resumed.step == 3
    resumed.fit()
    assert _losses(half) == _losses(full)[:3]
    assert _losses(resumed) == _losses(full)[3:]  # bit-identical, not just close
    a, b = full.raw_model.state_dict(), resumed.raw_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and balance biases alike
    h = half.raw_model.state_dict()  # 3 steps of +-gamma cannot sum to zero: the biases did move
    assert all(float(v.abs().min()) > 0 for k, v in h.items() if k.endswith("e_score_correction_bias"))
    # metrics.jsonl of the resumed run continues the first 3 steps without duplicates
    steps = [json.loads(line)["step"] for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_layout_keep_last_and_resolve(tok, streams, tmp_path):
    t = _trainer(tok, streams, tmp_path, steps=5, save_interval=1, keep_last=2)
    t.fit()
    ckpts = list_checkpoints(tmp_path)
    assert [s for s, _ in ckpts] == [4, 5]
    d = resolve_checkpoint(tmp_path)
    assert d == ckpts[-1][1] and resolve_checkpoint(d) == d
    assert {p.name for p in d.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                            "tokenizer_config.json", "trainer_state.pt", "train_args.json"}
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    transformers = pytest.importorskip("transformers")  # the checkpoint is a plain HF checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d))
    ids = torch.randint(0, tok.vocab_size, (1, 12))
    ours = load_model(d).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        resolve_checkpoint(tmp_path / "empty")


def test_corrupt_checkpoint_gives_a_clear_error(tok, streams, tmp_path):
    _trainer(tok, streams, tmp_path, steps=1).fit()
    d = resolve_checkpoint(tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"step_0000001.*corrupt or truncated"):
        load_model(d)
    s = d / "trainer_state.pt"
    s.write_bytes(s.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is corrupt or truncated"):
        load_trainer_state(d)
    # the CLI: one clear line, non-zero exit
    from moonlet.cli import main

    assert main(["train", "--out", str(tmp_path), "--resume"]) == 1


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    child = textwrap.dedent(f"""
        import sys, torch
        from moonlet.config import preset
        from moonlet.model import CausalLM
        from moonlet.train.checkpoint import save_checkpoint
        cfg = preset("tiny").replace(vocab_size=8192, num_hidden_layers=4)
        model = CausalLM(cfg).init_weights(seed=0)
        state = {{"format": 1, "step": 0, "blob": torch.randn(2_000_000)}}
        step = 0
        while True:
            step += 1
            state["step"] = step
            save_checkpoint({str(tmp_path)!r}, step, model, state, {{"step": step}}, keep_last=2)
            print(step, flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    killed_mid_save = False
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, env=env, text=True)
        try:
            assert proc.stdout.readline().strip().isdigit()  # at least one save completed
            time.sleep(0.05 + 0.07 * attempt)  # now it is (almost always) inside the next save
        finally:
            proc.kill()  # SIGKILL: no cleanup handlers run
            proc.wait(timeout=30)
        leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
        killed_mid_save |= bool(leftovers)
        ckpt = resolve_checkpoint(tmp_path)
        model = load_model(ckpt)  # loads: complete weights and config
        assert load_trainer_state(ckpt)["step"] == int(ckpt.name.split("_")[1])
        assert model.config.num_hidden_layers == 4
        if killed_mid_save:
            break
    assert killed_mid_save, "never caught the child inside a save"


def test_nonfinite_steps_are_skipped_then_stop_the_run(tok, streams, tmp_path):
    calls = {"n": 0}

    def poison(out, batch):  # steps 3.. produce an infinite loss
        calls["n"] += 1
        return torch.tensor(float("inf")) if calls["n"] > 4 else None

    t = _trainer(tok, streams, tmp_path, steps=20, save_interval=2, max_nonfinite=3, extra_losses={"poison": poison})
    before = None
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row.*last good checkpoint is .*step_0000002"):
        t.fit()
    skips = [r for r in t.history if r.get("kind") == "skip"]
    assert len(skips) == 3 and t.step == 5
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert before is None


def test_ctrl_c_saves_and_exits_cleanly(tok, streams, tmp_path):
    state = {"n": 0}

    def interrupt(out, batch):
        state["n"] += 1
        if state["n"] == 5:  # during step 3 (2 micro-batches per step)
            os.kill(os.getpid(), signal.SIGINT)
        return None

    t = _trainer(tok, streams, tmp_path, steps=50, extra_losses={"interrupt": interrupt})
    summary = t.fit()
    assert summary["stopped"] == "SIGINT" and summary["step"] == 3
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_bias_update_moves_a_skewed_router_toward_balance():
    cfg = preset("tiny").replace(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        moe.gate.weight[0] += 0.5  # expert 0 and 1 attract most tokens
        moe.gate.weight[1] += 0.3
    x = torch.randn(1, 512, 32) + 1.0
    imbalances, b0 = [], None
    for step in range(120):
        with torch.no_grad():
            _, stats = moe(x)
        imbalances.append(imbalance(stats.load_E))
        old = moe.gate.e_score_correction_bias.clone()
        update_expert_bias_(moe.gate, stats.load_E, gamma=0.005)
        delta = moe.gate.e_score_correction_bias - old
        load = stats.load_E.float()
        assert torch.allclose(delta, 0.005 * torch.sign(load.mean() - load), atol=1e-8)  # b += gamma sign(mean - load)
        if step == 0:
            b0 = delta
    # from max/mean 4.0 (experts 0 and 1 take all the tokens) to ~1.5 (sign updates keep a small limit cycle)
    assert imbalances[0] >= 3.5 and sum(imbalances[-20:]) / 20 < 1.7 and max(imbalances[-20:]) < 2.0
    assert b0[0] < 0 and b0[1] < 0  # overloaded experts pushed down first
    assert moe.gate.weight.grad is None  # outside autograd


def test_schedules():
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(54, 100, 10, "cosine", 0.0) == pytest.approx(0.5, abs=0.02)
    assert lr_multiplier(79, 100, 10, "wsd", 0.0, decay_fraction=0.2) == 1.0
    assert lr_multiplier(89, 100, 10, "wsd", 0.0, decay_fraction=0.2) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, 10, "wsd", 0.0, decay_fraction=0.2) == pytest.approx(0.0)
    assert lr_multiplier(50, 100, 10, "constant") == 1.0


def test_cli_train_resume_plot_sft(tmp_path, tok):
    """The user path: moonlet train on a text file, --resume to extend, moonlet plot, moonlet sft on chat JSONL."""
    from moonlet.cli import main
    from moonlet.data.tasks import generate, write_chat_jsonl

    data = tmp_path / "data.txt"
    data.write_text(bundled_documents("val")[1][:30_000])
    tok.save(tmp_path / "tok")
    run = tmp_path / "run"
    sets = [f"{k}={json.dumps(v)}" for k, v in MICRO.items()]
    common = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "2", "--log-interval", "1"]
    assert main(["train", "--preset", "tiny", "--set", *sets, "--data", str(data), "--tokenizer",
                 str(tmp_path / "tok"), "--out", str(run), "--steps", "2", *common]) == 0
    assert main(["train", "--out", str(run), "--steps", "3", "--resume"]) == 0
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    assert main(["train", "--out", str(run), "--steps", "4", "--resume", "--seq-len", "64"]) == 1  # data order
    assert main(["train", "--preset", "tiny", "--out", str(run), "--steps", "2"]) == 1  # would clobber the run
    assert main(["plot", str(run)]) == 0 and (run / "loss.png").stat().st_size > 10_000
    write_chat_jsonl(generate(60, levels=(1,)), tmp_path / "chat.jsonl")
    assert main(["sft", "--init", str(run), "--data", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "sft"),
                 "--steps", "2", "--precision", "bf16", *common]) == 0
    args = json.loads((resolve_checkpoint(tmp_path / "sft") / "train_args.json").read_text())
    assert args["options"]["mode"] == "sft" and args["options"]["init"].endswith("step_0000003")
