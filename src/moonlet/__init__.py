"""moonlet: train, study, evaluate and serve DeepSeek-V3 / Kimi-K2 style MoE + MLA models."""

from .config import ModelConfig, ConfigError, preset, PRESETS
from .model import CausalLM

__version__ = "0.1.0"


def from_pretrained(path_or_preset: str, **kwargs) -> CausalLM:
    """A model from an HF-format directory (moonlet checkpoints and run directories included; DeepSeek /
    Kimi FP8 releases are dequantized) or a preset name (random weights, `seed=`).
    kwargs: dtype (None = float32, "auto", "bf16", torch dtype), device, seed, mtp, strict."""
    from .interop.hf import from_pretrained as _load

    if not (isinstance(path_or_preset, str) and path_or_preset in PRESETS):
        try:  # a training run directory -> its newest complete checkpoint (CONTRACTS.md)
            from .train.checkpoint import resolve_checkpoint
        except ModuleNotFoundError as e:
            if e.name not in ("moonlet.train", "moonlet.train.checkpoint"):
                raise
        else:
            path_or_preset = resolve_checkpoint(path_or_preset)
    return _load(path_or_preset, **kwargs)


__all__ = ["ModelConfig", "ConfigError", "preset", "PRESETS", "CausalLM", "from_pretrained", "__version__"]
