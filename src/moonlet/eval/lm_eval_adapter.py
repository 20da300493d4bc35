"""EleutherAI lm-evaluation-harness adapter: `moonlet` as an lm_eval model.

    pip install -e ".[lm-eval]"            # lm-eval 0.4.x; resolves against the pinned torch, pulls none
    python -m moonlet.eval.lm_eval_adapter --model moonlet --model_args checkpoint=runs/demo \\
        --tasks lambada_openai --batch_size 1
    # Python: lm_eval.simple_evaluate(model=MoonletLM(checkpoint="runs/demo"), tasks=[...])

lm_eval's own `lm_eval` command cannot see third-party models (0.4.x has no plugin entry point for
them), so `python -m moonlet.eval.lm_eval_adapter` registers "moonlet" and then runs lm_eval's CLI
with the same arguments. Task data comes from the HF hub unless the task is local: that download is
lm_eval's, not moonlet's.

Implements loglikelihood (summed log-prob of the continuation + whether greedy decoding would produce
it), loglikelihood_rolling (lm_eval's rolling windows: every token scored once with maximal
context) and generate_until (the engine when available, else the naive decoder).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .backends import (BackendError, EngineBackend, GenParams, GenRequest, NaiveBackend, load_tokenizer,
                       resolve_checkpoint)
from .code_grader import truncate_at_stops
from .tasks import Prompt


@register_model("moonlet")
class MoonletLM(LM):
    def __init__(self, checkpoint: str | None = None, model: Any = None, tokenizer: Any = None,
                 dtype: str | None = None, max_length: int | None = None, batch_size: int | str = 1,
                 backend: str = "auto", device: str | None = "cpu", **_: Any):
        super().__init__()
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"moonlet: {device} is not available here, using cpu", file=sys.stderr)
            device = "cpu"
        if model is None:
            if checkpoint is None:
                raise ValueError("MoonletLM needs checkpoint=PATH (or model= and tokenizer=)")
            import moonlet

            ckpt = resolve_checkpoint(checkpoint)
            model = moonlet.from_pretrained(str(ckpt), dtype=getattr(torch, dtype) if dtype else None)
            tokenizer = tokenizer or load_tokenizer(ckpt)
            self._checkpoint = str(ckpt)
        else:
            self._checkpoint = checkpoint or "in-memory"
        if tokenizer is None:
            raise ValueError("MoonletLM needs a tokenizer")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        cfg = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048))
        self.backend_kind = backend
        self._gen = None

    # ---- helpers ---------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        for attr in ("bos_id", "eot_id", "eos_id"):
            v = getattr(self.tokenizer, attr, None)
            if v is not None:
                return int(v)
        raise ValueError("the tokenizer has no BOS/EOS token to condition on")

    @property
    def tokenizer_name(self) -> str:
        return self._checkpoint

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    @torch.inference_mode()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether each continuation token is the argmax."""
        ids = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        x = torch.tensor([ids[:-1]], device=self._device)
        logits_TV = self.model(x).logits[0, -n:].float()
        logp_TV = F.log_softmax(logits_TV, -1)
        tgt = torch.tensor(continuation, device=self._device)
        ll = float(logp_TV.gather(-1, tgt[:, None]).sum())
        return ll, bool((logits_TV.argmax(-1) == tgt).all())

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm_eval's convention: trailing context spaces belong to the continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        cont = whole[len(ctx):]
        if not ctx:
            ctx = [self.prefix_token_id]
        return ctx, cont

    # ---- lm_eval API ------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = self._split(context, continuation)
            if not cont:
                out.append((0.0, True))
                continue
            out.append(self._score(ctx, cont))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            tokens = self._encode(req.args[0])
            total = 0.0
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                total += self._score(list(ctx), list(cont))[0]
            out.append(total)
        return out

    def _generator(self):
        if self._gen is None:
            if self.backend_kind in ("auto", "engine"):
                try:
                    from moonlet.infer.engine import Engine

                    self._gen = EngineBackend(Engine(self.model, tokenizer=self.tokenizer), self.tokenizer)
                except (ImportError, BackendError, TypeError):
                    if self.backend_kind == "engine":
                        raise
            if self._gen is None:
                self._gen = NaiveBackend(self.model, self.tokenizer)
        return self._gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        reqs, stops = [], []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            params = GenParams(max_new_tokens=int(kw.get("max_gen_toks", 256)), temperature=temperature,
                               top_p=float(kw.get("top_p", 1.0) or 1.0), seed=kw.get("seed"))
            reqs.append(GenRequest(Prompt(text=context, stop=tuple(until)), params))
            stops.append(until)
        texts = self._generator().generate(reqs)
        return [truncate_at_stops(t, s) for t, s in zip(texts, stops)]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        ids = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.decode(list(ids), skip_special=False)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's CLI with "moonlet" registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
