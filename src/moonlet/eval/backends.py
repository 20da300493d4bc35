"""Where completions come from. The runner only sees `Backend.generate(requests) -> list[str]`.

  EngineBackend    a local checkpoint through moonlet's batched engine (moonlet.infer.engine)
  OpenAIBackend    any OpenAI-compatible server (`moonlet serve`, vLLM, ...) via the `openai` client
  NaiveBackend     a local model decoded step by step without a KV cache: slow, dependency-free,
                   a reference for checking the engine (`--backend naive`)
  CallableBackend  a Python function (tests, oracles, custom pipelines)

Prompts are raw text (completion endpoint / tokenizer.encode) or chat messages (chat endpoint /
tokenizer.apply_chat_template). Sample i of an item uses seed `seed + i`, so a resumed run draws
the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from .tasks import Prompt


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class GenRequest:
    prompt: Prompt
    params: GenParams


class Backend(Protocol):
    name: str

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """One completion (text after the prompt) per request, in order."""
        ...


class BackendError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# checkpoints and tokenizers


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir unchanged; a training run dir -> its newest complete checkpoint."""
    try:
        from moonlet.train.checkpoint import resolve_checkpoint as _resolve  # training area
    except ImportError:
        _resolve = None
    if _resolve is not None:
        return Path(_resolve(path))
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    ckdir = p / "checkpoints"
    if ckdir.is_dir():
        steps = sorted((d for d in ckdir.glob("step_*") if (d / "config.json").is_file()
                        and any((d / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))),
                       key=lambda d: d.name)
        if steps:
            return steps[-1]
    raise FileNotFoundError(f"{p} is neither a checkpoint directory (config.json + model.safetensors) "
                            "nor a training run directory with checkpoints")


class _HFTokenizer:
    """Fallback when moonlet.data.tokenizer is unavailable: a `tokenizers` tokenizer.json with the
    same encode/decode/bos_id/eos_id surface (no chat template)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self._tok = _Tok.from_file(str(file))
        cfg_file = file.with_name("tokenizer_config.json")
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

        def tid(key: str) -> int | None:
            t = cfg.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            return self._tok.token_to_id(t) if t else None

        self.bos_id, self.eos_id, self.pad_id = tid("bos_token"), tid("eos_token"), tid("pad_token")
        self.eot_id = tid("eot_token")
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True):
        raise BackendError("chat prompts need moonlet.data.tokenizer (chat template); use --raw")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """moonlet's Tokenizer for a checkpoint dir (or tokenizer.json), falling back to plain `tokenizers`."""
    try:
        from moonlet.data.tokenizer import Tokenizer  # training area
    except ImportError:
        return _HFTokenizer(Path(path))
    return Tokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------
# backends


class CallableBackend:
    def __init__(self, fn: Callable[[GenRequest], str], name: str = "callable"):
        self.fn, self.name = fn, name

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        return [self.fn(r) for r in requests]


class EngineBackend:
    """moonlet.infer.engine.Engine: batched generation with the latent KV cache."""

    def __init__(self, engine: Any, tokenizer: Any = None, name: str = "engine"):
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = None, **kw: Any) -> "EngineBackend":
        try:
            from moonlet.infer.engine import Engine
        except ImportError as e:
            raise BackendError(f"the local engine (moonlet.infer.engine) is not available ({e}); "
                               "use --backend naive for the slow reference decoder") from None
        return cls(Engine.from_pretrained(str(path), dtype=dtype, **kw), name=str(path))

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        from moonlet.infer.engine import SamplingParams

        out: list[str | None] = [None] * len(requests)
        # chat prompts go in as token ids (chat template), raw prompts as text; one call per kind
        for want_chat in (False, True):
            idx = [i for i, r in enumerate(requests) if (r.prompt.messages is not None) == want_chat]
            if not idx:
                continue
            prompts: list[Any] = []
            for i in idx:
                p = requests[i].prompt
                if want_chat:
                    if self.tokenizer is None:
                        raise BackendError("chat prompts need a tokenizer with a chat template")
                    prompts.append(list(self.tokenizer.apply_chat_template(p.as_record(), add_generation_prompt=True)))
                else:
                    prompts.append(p.text)
            params = [SamplingParams(max_new_tokens=requests[i].params.max_new_tokens,
                                     temperature=requests[i].params.temperature, top_p=requests[i].params.top_p,
                                     seed=requests[i].params.seed, stop=tuple(requests[i].prompt.stop))
                      for i in idx]
            results = self.engine.generate(prompts, params)
            for i, res in zip(idx, results):
                text = res.text
                if text is None:
                    text = self.tokenizer.decode(list(res.token_ids)) if self.tokenizer is not None else ""
                out[i] = text
        return [t or "" for t in out]


class OpenAIBackend:
    """An OpenAI-compatible endpoint: /v1/completions for raw prompts, /v1/chat/completions for chat."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 4, timeout: float = 600.0, http_client: Any = None):
        try:
            from openai import OpenAI
        except ImportError:
            raise BackendError("evaluating an endpoint needs the `openai` package (pip install openai)") from None
        url = base_url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        kw = {"http_client": http_client} if http_client is not None else {}
        self.client = OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             timeout=timeout, max_retries=2, **kw)
        self.base_url = url
        self.concurrency = concurrency
        if model is None:
            try:
                models = [m.id for m in self.client.models.list()]
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"could not list models at {url} ({e}); pass --model") from None
            if not models:
                raise BackendError(f"{url} serves no models; pass --model")
            model = models[0]
        self.model = model
        self.name = f"{url} ({model})"

    def _one(self, r: GenRequest) -> str:
        p = r.params
        extra = {"seed": p.seed} if p.seed is not None else {}
        stop = list(r.prompt.stop[:4]) or None  # the API takes at most 4; the runner cuts the rest
        if r.prompt.messages is not None:
            resp = self.client.chat.completions.create(
                model=self.model, messages=r.prompt.as_record(), max_tokens=p.max_new_tokens,
                temperature=p.temperature, top_p=p.top_p, stop=stop, **extra)
            return resp.choices[0].message.content or ""
        resp = self.client.completions.create(
            model=self.model, prompt=r.prompt.text or "", max_tokens=p.max_new_tokens,
            temperature=p.temperature, top_p=p.top_p, stop=stop, **extra)
        return resp.choices[0].text or ""

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as ex:
            return list(ex.map(self._one, requests))


class NaiveBackend:
    """Token-by-token decoding with a full forward pass per token (no cache). Sampling: greedy at
    temperature 0, else temperature + top-p with a per-request seeded generator."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "naive"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        cfg = getattr(model, "config", None)
        stops = set(getattr(cfg, "eos_token_ids", []) or [])
        for attr in ("eos_id", "eot_id"):
            v = getattr(tokenizer, attr, None)
            if v is not None:
                stops.add(int(v))
        self.stop_ids = stops

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = None) -> "NaiveBackend":
        from moonlet.interop.hf import from_pretrained

        ckpt = resolve_checkpoint(path)
        return cls(from_pretrained(ckpt, dtype=dtype), load_tokenizer(ckpt), name=str(path))

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        return [self._one(r) for r in requests]

    def _one(self, r: GenRequest) -> str:
        return self.tokenizer.decode(self.generate_ids(r)[1])

    def generate_ids(self, r: GenRequest) -> tuple[list[int], list[int]]:
        """(prompt ids, new ids) for one request."""
        import torch

        tok = self.tokenizer
        if r.prompt.messages is not None:
            ids = list(tok.apply_chat_template(r.prompt.as_record(), add_generation_prompt=True))
        else:
            ids = list(tok.encode(r.prompt.text or "", add_bos=True))
        p = r.params
        gen = torch.Generator().manual_seed(p.seed if p.seed is not None else 0)
        new: list[int] = []
        max_len = getattr(getattr(self.model, "config", None), "max_position_embeddings", 1 << 30)
        with torch.inference_mode():
            for _ in range(p.max_new_tokens):
                if len(ids) + len(new) >= max_len:
                    break
                x = torch.tensor([ids + new])
                logits = self.model(x, last_only=True).logits[0, -1].float()
                if p.temperature <= 0:
                    nxt = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / p.temperature, -1)
                    if p.top_p < 1.0:
                        sp, si = probs.sort(descending=True)
                        keep = sp.cumsum(0) - sp < p.top_p
                        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                if nxt in self.stop_ids:
                    break
                new.append(nxt)
                if r.prompt.stop:
                    text = tok.decode(new)
                    if any(s in text for s in r.prompt.stop):
                        break
        return ids, new
