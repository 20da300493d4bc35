"""`Tokenizer`: a byte-level BPE (HF `tokenizers`) plus special tokens and a chat template.

moonlet's own tokenizers (`train_tokenizer`, `moonlet tokenizer train`) have these special tokens,
always at the same ids so the presets' `bos/eos/pad_token_id` fit:

    0 <|pad|>  1 <|bos|>  2 <|eos|>  3 <|eot|> (end of turn)  4 <|system|>  5 <|user|>  6 <|assistant|>

and this chat template (jinja, stored in tokenizer_config.json as transformers expects):

    <|bos|><|user|>What is 2+3?<|eot|><|assistant|>2 + 3 = 5<|eot|>

Digits are split one per token before BPE (numbers tokenise the same way however they are
written, which is what makes arithmetic learnable for a small model).

An existing HF `tokenizer.json` (+ `tokenizer_config.json`) loads too: its special tokens and jinja
chat template are read from the config and rendered with jinja2 (a dependency of torch).
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..config import atomic_write_text

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# end-of-turn spellings of well-known tokenizers, tried when tokenizer_config.json names none
_EOT_CANDIDATES = ("<|eot|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None):
        self._tok = tok
        self.config = dict(config or {})

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """A `tokenizer.json`, or a directory holding one (and optionally tokenizer_config.json)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.exists():
            raise FileNotFoundError(f"no tokenizer.json at {p}")
        try:
            tok = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{p} is not a valid tokenizer.json: {e}") from None
        config: dict = {}
        cfg_path = p.with_name("tokenizer_config.json")
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        return cls(tok, config)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json into directory `path` (atomically each)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self._tok.to_str(pretty=False))
        atomic_write_text(d / "tokenizer_config.json", json.dumps(self.config, indent=2) + "\n")
        return d

    # ---- special tokens ---------------------------------------------------------------------------
    def _special(self, key: str) -> str | None:
        v = self.config.get(key)
        if isinstance(v, dict):  # transformers' AddedToken serialisation
            v = v.get("content")
        return v if isinstance(v, str) else None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @cached_property
    def bos_id(self) -> int | None:
        return self._id(self._special("bos_token"))

    @cached_property
    def eos_id(self) -> int | None:
        return self._id(self._special("eos_token"))

    @cached_property
    def pad_id(self) -> int | None:
        pid = self._id(self._special("pad_token"))
        return self.eos_id if pid is None else pid

    @cached_property
    def eot_id(self) -> int | None:
        """End of an assistant turn: what generation stops on in chat."""
        for t in (self._special("eot_token"),) + _EOT_CANDIDATES:
            i = self._id(t)
            if i is not None:
                return i
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> set[int]:
        ids = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        return {self._tok.token_to_id(t) for t in ids} | {i for i in (self.bos_id, self.eos_id, self.pad_id, self.eot_id) if i is not None}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ---- text -------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no bos token")
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    # ---- chat ---------------------------------------------------------------------------------------
    @cached_property
    def chat_template(self) -> str | None:
        t = self.config.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if t is None and all(self._tok.token_to_id(s) is not None for s in SPECIAL_TOKENS):
            t = CHAT_TEMPLATE  # a moonlet tokenizer whose config was lost
        return t

    @cached_property
    def _template(self):
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has no 'chat_template')")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise ValueError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text (special tokens spelled out)."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._special("bos_token") or "", eos_token=self._special("eos_token") or "",
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """messages [{"role": "system"|"user"|"assistant", "content": str}] -> token ids."""
        return self._tok.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """(ids, assistant_mask) of a whole conversation; mask is True exactly on the tokens the
        assistant produced (each assistant message's content and its end-of-turn token, not the
        role header that the prompt supplies). Found by rendering growing prefixes of the
        conversation, so it works for any template whose renderings extend each other."""
        ids: list[int] = []
        mask: list[bool] = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = self.apply_chat_template(messages[:i], add_generation_prompt=True)
                self._check_prefix(ids, prompt, i)
                mask += [False] * (len(prompt) - len(ids))
                ids = prompt
            full = self.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            self._check_prefix(ids, full, i)
            mask += [m["role"] == "assistant"] * (len(full) - len(ids))
            ids = full
        return ids, mask

    @staticmethod
    def _check_prefix(prev: list[int], new: list[int], i: int) -> None:
        if new[: len(prev)] != prev:
            raise ValueError(
                f"the chat template's rendering of the first {i + 1} messages does not extend the rendering of "
                f"the first {i}; cannot tell which tokens are the assistant's")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                    length: int | None = None) -> Tokenizer:
    """Train moonlet's byte-level BPE (special tokens and chat template as in the module docstring)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": None,
        "eot_token": "<|eot|>",
        "additional_special_tokens": ["<|eot|>", "<|system|>", "<|user|>", "<|assistant|>"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    return Tokenizer(tok, config)
