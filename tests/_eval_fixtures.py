"""Shared helpers for the eval tests: a tiny byte-level BPE tokenizer and a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "To be or not to be, that is the question. 12 + 7 = 19. 3 * 4 = 12. "
    "All that glitters is not gold; all who wander are not lost. "
) * 8


def make_tokenizer(dir_: Path, vocab_size: int = 320) -> Path:
    """tokenizer.json (+ tokenizer_config.json) with <pad>=0, <bos>=1, <eos>=2 like the tiny preset."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    dir_.mkdir(parents=True, exist_ok=True)
    tok.save(str(dir_ / "tokenizer.json"))
    (dir_ / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}))
    return dir_


def make_checkpoint(dir_: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random tiny-preset model (vocab 512) saved in moonlet's checkpoint layout with a tokenizer."""
    import moonlet
    from moonlet.config import preset

    cfg = preset("tiny").replace(vocab_size=512, num_hidden_layers=layers)
    model = moonlet.CausalLM(cfg).init_weights(seed=seed)
    model.save_pretrained(dir_)
    make_tokenizer(dir_)
    return dir_
