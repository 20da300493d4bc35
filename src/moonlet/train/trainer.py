"""The training loop: one optimizer step = grad_accum micro-batches, then clip, step, balance, clip QK.

Per step:
  lr <- base_lr * schedule(step)
  for each micro-batch: forward (bf16 autocast optional) -> loss = CE + mtp_lambda * mean_k MTP_k
      + balance loss (alpha, inside the model) [+ extra losses]; backward(loss / grad_accum)
  non-finite loss or grad norm -> the step is skipped (logged); max_nonfinite in a row -> stop
  grad norm clipped -> optimizer step -> expert bias update (gamma, outside autograd, from the
  step's expert loads) -> QK-clip (MuonClip, from the step's per-head max logits)
Every `eval_interval` steps the validation loss; every `save_interval` a checkpoint (rank 0); a
first Ctrl-C (or SIGTERM) finishes the current step, saves and returns; a second one aborts.

Seams for what comes later: `Runtime` (distributed: sharding, reductions, clipping, what to save),
`extra_losses` and `forward_kwargs` (training stages such as DSA's indexer warm-up, which also
freezes parameters: the optimizer is built over `requires_grad` parameters only).
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.loader import IGNORE_INDEX, Batch, RowLoader
from .balance import ExpertLoadTracker, imbalance, update_expert_bias_
from .checkpoint import list_checkpoints
from .optim import OPTIMIZERS, QKClip, build_optimizer
from .runtime import Runtime
from .schedule import SCHEDULES, lr_multiplier

STATE_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for max_nonfinite steps in a row."""


@dataclass
class TrainArgs:
    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 16  # rows per micro-batch per rank
    seq_len: int = 256
    grad_accum: int = 1
    optimizer: str = "muonclip"  # adamw | muon | muonclip
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_momentum: float = 0.95
    qk_clip_tau: float = 100.0
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)
    bias_update_gamma: float = 1e-3  # aux-loss-free balancing speed (0: off)
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight (0: off)
    mtp_lambda: float = 0.3
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer states stay fp32)
    seed: int = 0
    eval_interval: int = 100  # 0: only at the end
    eval_batches: int = 20
    log_interval: int = 10
    save_interval: int = 0  # 0: only at the end (and on Ctrl-C)
    keep_last: int = 3
    max_nonfinite: int = 5
    max_time: float = 0.0  # seconds of training before a clean stop (0: none)

    def validate(self) -> "TrainArgs":
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_interval", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "eval_batches", "save_interval", "keep_last", "grad_clip",
                     "bias_update_gamma", "balance_alpha", "mtp_lambda", "weight_decay", "max_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as it goes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run re-does those steps)."""
        if not self.path.exists():
            return
        from ..config import atomic_write_text

        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _record_step(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
        return 0


class Trainer:
    def __init__(self, model, args: TrainArgs, train_loader: RowLoader, val_loader: RowLoader | None = None,
                 run_dir: str | Path | None = None, tokenizer=None, runtime: Runtime | None = None,
                 run_info: dict | None = None,
                 extra_losses: dict[str, Callable[[object, Batch], torch.Tensor | None]] | None = None,
                 forward_kwargs: dict | None = None, progress: bool | None = None,
                 print_fn: Callable[[str], None] = print):
        self.args = args.validate()
        self.runtime = runtime or Runtime()
        self.raw_model = model.to(self.runtime.device)
        self.raw_model.set_balance_alpha(args.balance_alpha)
        self.model = self.runtime.wrap_model(self.raw_model)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tokenizer = tokenizer
        self.run_info = dict(run_info or {})
        self.extra_losses = dict(extra_losses or {})
        self.forward_kwargs = dict(forward_kwargs or {})
        self.print = print_fn if self.runtime.is_main else (lambda *_: None)
        self.optimizer = self.runtime.prepare_optimizer(build_optimizer(
            self.model, args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
            betas=(args.beta1, args.beta2), momentum=args.muon_momentum))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.qk_clip = (QKClip(self.raw_model, args.qk_clip_tau, self.runtime.scale_rows_)
                        if args.optimizer == "muonclip" else None)
        self.loads = ExpertLoadTracker(self.raw_model)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.nonfinite_streak = 0
        self.last_val: float | None = None
        self.history: deque[dict] = deque(maxlen=20_000)  # recent train/val records (all are in metrics.jsonl)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl") if self.run_dir and self.runtime.is_main else None
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.runtime.is_main
        self._stop_reason: str | None = None
        torch.manual_seed(args.seed)
        random.seed(args.seed)

    # ---- one step ---------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.runtime.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "bf16")

    def objective(self, out, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and its named parts (each already weighted as it enters the sum)."""
        a = self.args
        parts = {"ce": out.ce_loss}
        if out.mtp_losses:
            parts["mtp"] = a.mtp_lambda * torch.stack(out.mtp_losses).mean()
        if out.aux_loss is not None:
            parts["aux"] = out.aux_loss
        for name, fn in self.extra_losses.items():
            v = fn(out, batch)
            if v is not None:
                parts[name] = v
        return sum(parts.values()), parts

    def _needs_max_logit(self) -> bool:
        return self.qk_clip is not None or (self.step + 1) % self.args.log_interval == 0

    def train_step(self) -> dict:
        a = self.args
        lr_mult = lr_multiplier(self.step, a.steps, a.warmup_steps, a.schedule, a.min_lr_ratio, a.decay_fraction)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        self.model.train()
        record = self._needs_max_logit()
        sums: dict[str, float] = defaultdict(float)
        max_logits: list[torch.Tensor] | None = None
        finite, n_tokens, n_micro = True, 0, 0
        t0 = time.perf_counter()
        for _ in range(a.grad_accum):
            batch = self.train_loader.next_batch().to(self.runtime.device)
            n_tokens += batch.input_ids.numel()
            if self.runtime.skip_microbatch(batch):  # e.g. SFT rows whose assistant turns were truncated away
                continue
            with self._autocast():
                out = self.model(batch.input_ids, batch.labels, mtp_labels=batch.mtp_labels,
                                 mtp_lambda=a.mtp_lambda, record_max_logit=record, **self.forward_kwargs)
                self.runtime.normalize_losses(out, batch)
                loss, parts = self.objective(out, batch)
            self.loads.collect()
            if not self.runtime.loss_is_finite(loss):
                finite = False
                continue
            (loss / a.grad_accum).backward()
            n_micro += 1
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += float(v.detach())
            if out.mtp_losses:  # unweighted, for the log
                sums["mtp_ce"] += float(torch.stack(out.mtp_losses).detach().mean())
            if record and out.max_logits:
                cur = [m.detach().float() for m in out.max_logits]
                max_logits = cur if max_logits is None else [torch.maximum(x, y) for x, y in zip(max_logits, cur)]
        loads = [None if x is None else self.runtime.all_reduce(x, "sum") for x in self.loads.take()]
        if max_logits is not None:  # the global batch's (QK-clip and the log)
            max_logits = [self.runtime.all_reduce(m, "max") for m in max_logits]
        dev = self.runtime.device
        bad = self.runtime.all_reduce(torch.tensor(0.0 if finite and n_micro else 1.0, device=dev), "max")
        grad_norm = (self.runtime.clip_grad_norm_(self.params, a.grad_clip) if float(bad) == 0
                     else torch.tensor(float("nan")))
        record_out: dict = {"step": self.step + 1, "lr": a.lr * lr_mult}
        if float(bad) > 0 or not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            if finite and not n_micro:
                record_out.update(skipped=True, reason="no loss tokens in the batch")
            else:
                self.nonfinite_streak += 1
                record_out.update(skipped=True, reason="non-finite loss or gradient")
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_streak = 0
            if a.bias_update_gamma > 0:
                for layer, load in zip(self.loads.layers, loads):
                    if load is not None:
                        update_expert_bias_(layer.gate, load, a.bias_update_gamma)
            if self.qk_clip is not None and max_logits is not None:
                record_out.update(self.qk_clip(max_logits))
        self.step += 1
        self.tokens_seen += n_tokens * self.runtime.world_size
        dt = time.perf_counter() - t0
        for k, v in sums.items():
            record_out[k] = float(self.runtime.all_reduce(torch.tensor(v / max(1, n_micro), device=dev), "mean"))
        record_out.update(grad_norm=float(grad_norm), tokens=self.tokens_seen, step_time=dt,
                          tokens_per_s=n_tokens * self.runtime.world_size / dt)
        if max_logits is not None:
            record_out["max_logit"] = max(float(m.max()) for m in max_logits)
        layer_imb = [imbalance(x) for x in loads if x is not None]
        if layer_imb:
            record_out["imbalance"] = [round(x, 3) for x in layer_imb]
        return record_out

    # ---- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> float | None:
        """Mean next-token CE over the validation rows (main head only); None without a val loader."""
        if self.val_loader is None:
            return None
        max_batches = self.args.eval_batches if max_batches is None else max_batches
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        count = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        for batch in self.val_loader.eval_batches(max_batches or None):
            batch = batch.to(self.runtime.device)
            with self._autocast():
                out = self.model(batch.input_ids, run_mtp=False, **self.forward_kwargs)
            total += F.cross_entropy(out.logits.float().flatten(0, 1), batch.labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").double()
            count += float(batch.n_loss_tokens)
        self.loads.take()  # eval forwards must not move the balance bias
        total, count = self.runtime.all_reduce(total, "sum"), self.runtime.all_reduce(count, "sum")
        self.model.train()
        return float(total / count) if count > 0 else None

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"format": STATE_FORMAT, "step": self.step, "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps, "last_val": self.last_val,
                "optimizer": self.runtime.optimizer_state_for_save(self.optimizer),
                "optimizer_name": self.args.optimizer, "loader": self.train_loader.state_dict(), "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"trainer state format {state.get('format')!r} is not {STATE_FORMAT}")
        if state.get("optimizer_name", self.args.optimizer) != self.args.optimizer:
            raise ValueError(f"the checkpoint was trained with --optimizer {state['optimizer_name']}; resuming with "
                             f"{self.args.optimizer} would drop its optimizer state (use --init to start over from "
                             f"its weights instead)")
        self.runtime.load_optimizer_state(self.optimizer, state["optimizer"])
        for g in self.optimizer.param_groups:  # a changed --lr on resume takes effect
            g["base_lr"] = self.args.lr
        self.train_loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps, self.last_val = int(state.get("skipped_steps", 0)), state.get("last_val")
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)

    def resume(self, ckpt: str | Path) -> None:
        """Restore optimizer, loader, RNG and counters from a checkpoint (weights are loaded with the
        model, or here by a runtime whose checkpoints are sharded)."""
        self.load_state_dict(self.runtime.load_checkpoint(ckpt, self.model, self.optimizer))

    def save(self, final: bool = False) -> Path | None:
        if self.run_dir is None:
            self.runtime.barrier()
            return None
        info = dict(self.run_info, args=asdict(self.args))
        return self.runtime.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.state_dict,
                                            info, self.tokenizer, self.args.keep_last, final=final)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        record = dict(record, time=round(time.time(), 3))
        self.history.append(record)
        if self.metrics is not None:
            self.metrics.write(record)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_reason is not None:  # second request: abort now
                raise KeyboardInterrupt
            self._stop_reason = signal.Signals(signum).name
            self.print(f"\n{self._stop_reason}: finishing step {self.step + 1}, then saving a checkpoint "
                       f"(press Ctrl-C again to abort without saving)")

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    def fit(self) -> dict:
        """Train until args.steps (or max_time, or a stop signal); returns a summary."""
        a = self.args
        old_handlers = self._install_signals()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=a.steps, initial=self.step, unit="step", dynamic_ncols=True, leave=True)
        say = bar.write if bar is not None else self.print
        start, train_time, train_tokens, window = time.perf_counter(), 0.0, 0, []
        ckpt = None
        try:
            if self.step == 0 and self.val_loader is not None and a.eval_interval:
                self._validate(say)
            while self.step < a.steps:
                rec = self.train_step()
                train_time += rec["step_time"]
                train_tokens += rec["tokens_per_s"] * rec["step_time"]
                window.append(rec)
                if rec.get("skipped"):
                    say(f"step {rec['step']}: skipped ({rec['reason']}); {self.nonfinite_streak} in a row")
                    self._log({"kind": "skip", **rec})
                    if self.nonfinite_streak >= a.max_nonfinite:
                        last = list_checkpoints(self.run_dir)[-1][1] if self.run_dir and list_checkpoints(self.run_dir) else None
                        raise TrainingDiverged(
                            f"the loss or gradient was not finite for {self.nonfinite_streak} steps in a row (steps "
                            f"{self.step - self.nonfinite_streak + 1}-{self.step}); stopping without saving. "
                            + (f"The last good checkpoint is {last}; " if last else "No checkpoint was saved yet; ")
                            + "try a lower --lr, --grad-clip 1.0 or --precision fp32.")
                    continue
                self._log({"kind": "train", **rec})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {rec['loss']:.3f} lr {rec['lr']:.2e} {rec['tokens_per_s']:,.0f} tok/s",
                                        refresh=False)
                if self.step % a.log_interval == 0 or self.step == a.steps:
                    say(self._format(window))
                    window = []
                if a.eval_interval and self.step % a.eval_interval == 0 and self.step < a.steps:
                    self._validate(say)
                if a.save_interval and self.step % a.save_interval == 0 and self.step < a.steps:
                    self.save()
                if self._stop_reason is not None:
                    break
                if a.max_time and time.perf_counter() - start > a.max_time:
                    self._stop_reason = f"max_time ({a.max_time:.0f}s)"
                    break
            if self.val_loader is not None and (not self.history or self.history[-1].get("kind") != "val"):
                self._validate(say)
            ckpt = self.save(final=True)
            if self._stop_reason is not None and self.step < a.steps:
                say(f"stopped at step {self.step}/{a.steps} ({self._stop_reason}); checkpoint {ckpt}; continue with --resume")
        finally:
            if bar is not None:
                bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        return {"step": self.step, "tokens": self.tokens_seen, "val_loss": self.last_val,
                "train_time_s": train_time, "wall_time_s": time.perf_counter() - start,
                "tokens_per_s": train_tokens / max(train_time, 1e-9),
                "skipped_steps": self.skipped_steps, "checkpoint": str(ckpt) if ckpt else None,
                "stopped": self._stop_reason}

    def _validate(self, say) -> None:
        val = self.evaluate()
        if val is None:
            return
        self.last_val = val
        self._log({"kind": "val", "step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50)),
                   "tokens": self.tokens_seen})
        say(f"step {self.step:>6} | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")

    def _format(self, window: list[dict]) -> str:
        r = window[-1]
        mean = lambda k: sum(x.get(k, 0.0) for x in window) / len(window)  # noqa: E731
        tok_s = sum(x["tokens_per_s"] * x["step_time"] for x in window) / max(1e-9, sum(x["step_time"] for x in window))
        s = (f"step {self.step:>6}/{self.args.steps} | loss {mean('loss'):.4f} (ce {mean('ce'):.3f}"
             + (f", mtp ce {mean('mtp_ce'):.3f}" if "mtp_ce" in r else "") + ")"
             + f" | lr {r['lr']:.2e} | gnorm {mean('grad_norm'):.2f} | {tok_s:,.0f} tok/s")
        if "max_logit" in r:
            s += f" | max logit {r['max_logit']:.1f}"
        if "imbalance" in r:
            s += f" | imbalance {max(r['imbalance']):.2f}"
        return s
