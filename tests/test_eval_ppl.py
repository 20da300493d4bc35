"""Perplexity / bits per byte: window bookkeeping, a hand-worked uniform model, and HF's documented
sliding-window loop on transformers' DeepseekV3ForCausalLM as the reference."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from _eval_fixtures import TEXT, make_checkpoint
from moonlet.eval.backends import load_tokenizer
from moonlet.eval.perplexity import effective_stride, perplexity, sliding_windows
from moonlet.eval.runner import evaluate


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 3), (10, 4, 1), (100, 32, 16), (101, 32, 7),
                                              (33, 64, 32), (64, 64, 32), (1000, 64, 63)])
def test_windows_score_every_target_once(n, window, stride):
    ws = sliding_windows(n, window, stride)
    scored = [t for w in ws for t in range(w.score_from, w.end)]
    assert sorted(scored) == list(range(1, n))  # token 0 has no context
    for w in ws:
        assert w.end - w.begin <= window and w.score_from > w.begin
    for w in ws[1:]:  # after the first window, context >= window - stride
        assert w.score_from - w.begin >= min(window - stride, w.score_from)


def test_window_errors():
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 4)  # stride == window would skip a target per window
    assert effective_stride(4, 4) == 3 and effective_stride(512, None) == 256
    with pytest.raises(ValueError):
        sliding_windows(1, 4, 2)


class Uniform(torch.nn.Module):
    """p(token) = 1/V everywhere: nll/token = ln V exactly."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.rows = 0

    def forward(self, ids):
        self.rows += ids.shape[0]
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocab))


class ByteTok:
    """One token per UTF-8 byte (ids 3..258), BOS = 1."""
    bos_id = 1

    def encode(self, text, add_bos=False):
        return [b + 3 for b in text.encode()]

    def decode(self, ids, skip_special=True):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


def test_uniform_model_hand_computed():
    text = "héllo wörld, " * 10  # multi-byte characters: bytes != characters
    r = perplexity(Uniform(300), ByteTok(), text, window=16, stride=8)
    n_bytes = len(text.encode())
    assert r.n_tokens == n_bytes and r.n_bytes == n_bytes  # BOS makes every byte a target
    assert r.nll_per_token == pytest.approx(math.log(300))
    assert r.perplexity == pytest.approx(300)
    assert r.bits_per_byte == pytest.approx(math.log2(300))
    tok = ByteTok()
    tok.bos_id = None  # without BOS the first token is context only and its bytes are not counted
    r = perplexity(Uniform(300), tok, text, window=16, stride=8)
    assert r.n_tokens == n_bytes - 1 and r.n_bytes == n_bytes - 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ppl") / "ckpt")


def hf_reference_nll(hf_model, ids, window, stride):
    """The loop of HF's 'Perplexity of fixed-length models' guide, summing nll * valid targets."""
    ids = torch.tensor([ids])
    n = ids.shape[1]
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        x = ids[:, begin:end]
        target = x.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(x, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_scored += valid
        prev_end = end
        if end == n:
            break
    return nll_sum, n_scored


def test_matches_transformers_sliding_window(ckpt):
    from transformers import AutoModelForCausalLM

    import moonlet

    tok = load_tokenizer(ckpt)
    text = TEXT[:400]
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = moonlet.from_pretrained(str(ckpt))
    ids = [tok.bos_id] + tok.encode(text)
    for window, stride in ((64, 40), (96, 95)):
        r = perplexity(ours, tok, text, window=window, stride=stride, batch_size=3)
        ref_sum, ref_n = hf_reference_nll(hf, ids, window, stride)
        assert r.n_tokens == ref_n == len(ids) - 1
        assert r.nll_sum == pytest.approx(ref_sum, rel=1e-5)
    assert 4.0 < r.nll_per_token < 8.0  # a random 512-vocab model: about ln(512) = 6.24


def test_runner_ppl_resumes(ckpt, tmp_path):
    import moonlet

    data = tmp_path / "val.txt"
    data.write_text(TEXT)
    model = Uniform(512)
    out = tmp_path / "out"
    tok = load_tokenizer(ckpt)
    full = evaluate(model=model, tokenizer=tok, task="ppl", data=data, out=out, window=32, stride=16,
                    progress=False)
    m = full["metrics"]
    assert m["nll_per_token"] == pytest.approx(math.log(512))
    assert m["bits_per_byte"] == pytest.approx(m["n_tokens"] * math.log2(512) / m["n_bytes"])
    assert (out / "report.md").read_text().count("perplexity") and (out / "report.png").stat().st_size > 0
    n_windows = m["n_windows"]
    # simulate a crash: last 3 rows lost, one half-written
    lines = (out / "items.jsonl").read_text().splitlines()
    (out / "items.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])
    model.rows = 0
    again = evaluate(model=model, tokenizer=tok, task="ppl", data=data, out=out, window=32, stride=16,
                     progress=False)
    assert model.rows == 3  # only the 3 lost windows are recomputed
    assert again["metrics"]["nll_per_token"] == pytest.approx(m["nll_per_token"])
    assert again["metrics"]["n_windows"] == n_windows and again["complete"]
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == n_windows == len({r["id"] for r in rows})
    # the checkpoint path works too (loads model + tokenizer)
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:500])
    s = evaluate(str(ckpt), "ppl", data=short, window=64, progress=False)
    ref = perplexity(moonlet.from_pretrained(str(ckpt)), tok, TEXT[:500], window=64, stride=32)
    assert s["metrics"]["nll_per_token"] == pytest.approx(ref.nll_per_token, rel=1e-6)
