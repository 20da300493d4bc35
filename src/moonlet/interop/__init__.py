"""Hugging Face / DeepSeek checkpoint interop: read (incl. FP8), write, convert."""

from .hf import (Checkpoint, convert_checkpoint, from_hf_state_dict, from_pretrained, load_checkpoint, load_into,
                 open_checkpoint, parse_dtype, read_safetensors_dir, save_pretrained, to_hf_state_dict)
from .store import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "convert_checkpoint", "from_hf_state_dict", "from_pretrained",
           "load_checkpoint", "load_into", "open_checkpoint", "parse_dtype", "read_safetensors_dir",
           "save_pretrained", "to_hf_state_dict"]
