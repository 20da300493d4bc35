"""Learning-rate schedules as pure functions of the step (so resuming needs only the step).

cosine:   linear warmup, then cosine from 1 to min_ratio at the last step.
wsd:      warmup-stable-decay (MiniCPM, DeepSeek-V3's pre-training shape): linear warmup, constant,
          then a linear decay to min_ratio over the last `decay_fraction` of the steps.
constant: linear warmup, then 1.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                  min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based) of `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    last = max(total_steps - 1, warmup_steps)
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, last - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(warmup_steps, int(round(total_steps * (1 - decay_fraction))))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    return 1.0 - (1 - min_ratio) * progress
