"""Speculative decoding with the model's own MTP module as the draft model.

MTP depth 1 at position i reads the main model's final hidden h_i and the embedding of token
t_{i+1}, and predicts t_{i+2}: once the main model has produced t_{n+1} from h_n, MTP drafts
t_{n+2} at almost no cost. k > 1 drafts chain the module (its output hidden stands in for the main
hidden of the next position). One main forward over [pending, d_1..d_k] verifies all drafts:

  greedy:      accept d_j while it is the argmax of the target at its position; the first
               mismatch is replaced by the argmax (so the output is exactly greedy decoding);
  temperature: accept d_j with prob min(1, p(d_j)/q(d_j)); on rejection sample the residual
               norm(max(p - q, 0)) and stop (Leviathan et al. / Chen et al. 2023): the produced
               tokens are distributed exactly as sampling from p token by token.
If all k drafts are accepted the target's distribution after d_k gives one bonus token.

The MTP module has its own latent cache (the depth's slot in `allocate_cache(..., mtp=True)`);
after each verify it is brought up to date for every accepted position in one MTP forward, whose
output at the last accepted position drafts the next round. Slots written for rejected drafts are
simply overwritten later (a token's slot is rewritten before anything reads it).

With compiled steps, k = 1 and plain greedy requests a whole round (verify, acceptance, MTP catch-up,
next draft) is one graph call (CompiledDecode.greedy_round); otherwise verify, MTP and draft are
separate calls. Whether drafting pays depends on the model's shape more than on the code: a draft
reads MTP's block, eh_proj and the head again, so a k = 1 round reads 1 + f main steps' worth of
weights for at most 1 + a tokens (f = 0.55 on the `tiny` preset, 0.30 on `small`, 0.04 on
DeepSeek-V3: bench/decode.py prints f and the ceiling (1 + a) / (1 + f)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..model.transformer import make_context
from .sampling import SamplerState, probs_from_logits, sample_token

if TYPE_CHECKING:
    from .scheduler import Request, Scheduler
    from .scheduler import TokenEvent


def verify(target_logits_TV: torch.Tensor, drafts: list[int], draft_probs: list[torch.Tensor | None],
           state: SamplerState) -> tuple[list[int], int]:
    """(produced tokens, number of drafts accepted) for one sequence; target_logits_TV holds the
    main model's logits after [pending, d_1, ..., d_k] (T = k + 1 rows, float32)."""
    params = state.params
    out: list[int] = []
    for j, d in enumerate(drafts):
        logits = state.penalize(target_logits_TV[j], drafts[:j])
        if params.greedy:
            t = int(logits.argmax())
            out.append(t)
            if t != d:
                return out, j
            continue
        p = probs_from_logits(logits, params)
        q = draft_probs[j]
        u = float(torch.rand((), generator=state.generator))
        if q[d] > 0 and u * float(q[d]) < float(p[d]):  # u < p/q without dividing
            out.append(d)
            continue
        residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing to correct
            residual = p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=state.generator)))
        return out, j
    out.append(sample_token(target_logits_TV[len(drafts)], state, drafts)[0])
    return out, len(drafts)


def _mtp_hidden(sched: "Scheduler", h_BTD: torch.Tensor, next_ids_BT: torch.Tensor, positions_BT: torch.Tensor,
                rows: tuple[int, int], fresh: bool = False) -> torch.Tensor:
    """MTP depth 1 over (h_i, Emb(t_{i+1})) at the given positions, writing its cache -> hidden [B,T,D]."""
    engine = sched.engine
    cache = sched.cache.view(*rows)
    if engine.compiled is not None and not fresh:
        return engine.compiled.mtp(h_BTD, next_ids_BT, positions_BT, cache)
    if engine.fast is not None:
        return engine.fast.mtp(h_BTD, next_ids_BT, positions_BT, cache, fresh=fresh)
    model = engine.model
    L = model.config.num_hidden_layers
    ctx = make_context(model.model.rotary, positions_BT, h_BTD.dtype, with_cache=True, absorbed=True)
    h, _ = model.mtp[0](h_BTD, model.model.embed_tokens(next_ids_BT), ctx, cache[L])
    return h


def _plain_greedy(reqs: list["Request"]) -> bool:
    """Every request greedy without penalties: argmax over the whole batch at once."""
    return all(r.params.greedy and not r.params.penalized for r in reqs)


def _draft(sched: "Scheduler", reqs: list["Request"], h_B1D: torch.Tensor, pos_B: torch.Tensor,
           rows: tuple[int, int]) -> None:
    """Draft k tokens per request from MTP hidden states h (at position pos, predicting pos + 2),
    chaining the module for k > 1; store them (and their sampling distributions) on the requests."""
    model, k = sched.engine.model, sched.engine.speculative
    greedy = _plain_greedy(reqs)
    for r in reqs:
        r.draft, r.draft_probs = [], []
    for j in range(k):
        logits = model.lm_head(h_B1D[:, 0]).float()
        if greedy:
            toks = logits.argmax(-1).tolist()
            for r, t in zip(reqs, toks):
                r.draft.append(t)
                r.draft_probs.append(None)
        else:
            toks = []
            for i, r in enumerate(reqs):
                t, q = sample_token(logits[i], r.sampler, r.draft)
                r.draft.append(t)
                r.draft_probs.append(q)
                toks.append(t)
        if j + 1 < k:
            pos_B = pos_B + 1
            h_B1D = _mtp_hidden(sched, h_B1D, torch.tensor(toks)[:, None], pos_B[:, None], rows)


def after_prefill(sched: "Scheduler", req: "Request", row: int, logits_V: torch.Tensor,
                  hidden_1PD: torch.Tensor) -> list["TokenEvent"]:
    """First token from the prefill logits, then fill MTP's cache over the prompt and draft."""
    tok = sample_token(logits_V, req.sampler)[0]
    ev = sched.accept_token(req, row, tok, logits_V)
    if req.finished:
        return [ev]
    P = hidden_1PD.shape[1]
    nxt = torch.tensor([req.prompt_ids[1:] + [tok]])
    h = _mtp_hidden(sched, hidden_1PD, nxt, torch.arange(P)[None], (row, row + 1), fresh=True)
    _draft(sched, [req], h[:, -1:], torch.tensor([P - 1]), (row, row + 1))
    return [ev]


def _fused(sched: "Scheduler", reqs: list["Request"]) -> bool:
    """Whether the round can be one compiled graph call (CompiledDecode.greedy_round): compiled steps,
    one draft, plain greedy, no logprobs (the graph returns tokens, not logits)."""
    return (sched.engine.compiled is not None and sched.engine.speculative == 1 and _plain_greedy(reqs)
            and all(r.logprobs is None for r in reqs))


def speculative_step(sched: "Scheduler", reqs: list["Request"]) -> list["TokenEvent"]:
    """One verify forward over all running rows, then MTP catches up and drafts the next round."""
    cache, engine = sched.cache, sched.engine
    n, k = len(reqs), engine.speculative
    L0 = torch.tensor([cache.lengths[i] for i in range(n)])
    x = torch.tensor([[r.pending] + r.draft for r in reqs])  # [n, k+1]
    pos = L0[:, None] + torch.arange(k + 1)[None]
    if _fused(sched, reqs):
        target, a_t, drafts = engine.compiled.greedy_round(x, pos, cache.view(0, n))
        a_list, target = a_t.tolist(), target.tolist()
        events = _accept(sched, reqs, [r.draft[:a] + [target[i][a]] for i, (r, a) in enumerate(zip(reqs, a_list))],
                         a_list, L0, None)
        for r, d in zip(reqs, drafts.tolist()):
            r.draft, r.draft_probs = [d], [None]
        return events
    logits, hidden = engine.decode(x, pos, cache.view(0, n), last_only=False)
    produced, accepted = [], []
    target = logits.argmax(-1).tolist() if _plain_greedy(reqs) else None  # [n][k+1]
    for i, r in enumerate(reqs):
        if target is not None:
            a = 0
            while a < k and r.draft[a] == target[i][a]:
                a += 1
            toks = r.draft[:a] + [target[i][a]]
        else:
            toks, a = verify(logits[i], r.draft, r.draft_probs, r.sampler)
        produced.append(toks)
        accepted.append(a)
    events = _accept(sched, reqs, produced, accepted, L0, logits)
    a_t = torch.tensor(accepted)
    # MTP over the verified positions: next token x_{j+1} where accepted, the new token at j = a
    nxt = torch.cat((x[:, 1:], torch.zeros(n, 1, dtype=x.dtype)), dim=1)
    j = torch.arange(k + 1)[None]
    nxt = torch.where(j >= a_t[:, None], torch.tensor([t[-1] for t in produced])[:, None], nxt)
    h = _mtp_hidden(sched, hidden, nxt, pos, (0, n))
    h_a = h[torch.arange(n), a_t][:, None]  # [n, 1, D] at each row's last accepted position
    _draft(sched, reqs, h_a, L0 + a_t, (0, n))
    return events


def _accept(sched: "Scheduler", reqs: list["Request"], produced: list[list[int]], accepted: list[int],
            L0: torch.Tensor, logits: torch.Tensor | None) -> list["TokenEvent"]:
    """Emit each row's produced tokens (stopping at its end) and advance its cache length over the
    pending token and the accepted drafts the verify forward fed."""
    cache, k = sched.cache, sched.engine.speculative
    events = []
    for i, (r, toks, a) in enumerate(zip(reqs, produced, accepted)):
        r.spec_proposed += k
        r.spec_accepted += a
        cache.lengths[i] = int(L0[i]) + 1  # the pending token is now in the cache
        for j, t in enumerate(toks):
            events.append(sched.accept_token(r, i, t, None if logits is None else logits[i, j]))
            if r.finished:
                break
            if j < a:
                cache.lengths[i] += 1  # an accepted draft was fed by the verify forward
    return events
