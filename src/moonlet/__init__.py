"""moonlet: train, study, evaluate and serve DeepSeek-V3 / Kimi-K2 style MoE + MLA models."""

from .config import ModelConfig, ConfigError, preset, PRESETS
from .model import CausalLM

__version__ = "0.1.0"


def from_pretrained(path_or_preset: str, **kwargs) -> CausalLM:
    """A model from an HF-format directory (moonlet checkpoints included) or a preset name (random
    weights, `seed=`). kwargs: dtype, device, seed."""
    from .interop.hf import from_pretrained as _load

    return _load(path_or_preset, **kwargs)


__all__ = ["ModelConfig", "ConfigError", "preset", "PRESETS", "CausalLM", "from_pretrained", "__version__"]
