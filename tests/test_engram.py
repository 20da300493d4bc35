"""Engram: hand-checked hashing and prime tables, same n-gram -> same slots, tables on another
device/dtype give the same outputs and are read before any block runs, a zero gate is the plain
model exactly, cached decode (n-gram + conv history) equals the full forward, checkpoints round-trip."""

import json

import pytest
import torch

from moonlet.config import ConfigError, ModelConfig, preset
from moonlet.interop.hf import from_pretrained, save_pretrained
from moonlet.interop.hf_compat import HFExportError, hf_export_blockers
from moonlet.model import CausalLM
from moonlet.model.block import allocate_cache
from moonlet.model.engram import (
    Engram, build_compression_map, engram_params, multipliers, ngram_hashes, place_tables, set_compression_map,
    set_gate_scale, table_sizes,
)

ENGRAM = dict(engram_layers=[0, 2], engram_dim_per_order=64, engram_heads_per_order=4, engram_table_size=[211, 307])


def _cfg(**changes) -> ModelConfig:
    return preset("tiny").replace(**{**ENGRAM, **changes})


def _model(seed=1, conv=True, **changes) -> CausalLM:
    m = CausalLM(_cfg(**changes)).init_weights(seed=seed, std=0.05).eval()
    if conv:  # the conv is zero-initialised; give it weights so its history path is exercised
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for e in m.modules():
                if isinstance(e, Engram):
                    e.conv.copy_(torch.randn(e.conv.shape, generator=g) * 0.5)
    return m


def test_prime_table_sizes_by_hand():
    cfg = preset("tiny").replace(engram_layers=[0, 1], engram_max_ngram=3, engram_heads_per_order=2,
                                 engram_dim_per_order=8, engram_table_size=[10, 10])
    # first unused prime >= the request, across layers, orders and heads
    assert table_sizes(cfg) == {0: [11, 13, 17, 19], 1: [23, 29, 31, 37]}


def test_hash_by_hand():
    """mix_2 = x_t r0 ^ x_{t-1} r1, mix_3 = mix_2 ^ x_{t-2} r2; slot = mix mod prime (pad 0 before start)."""
    cfg = preset("tiny").replace(engram_layers=[0], engram_max_ngram=3, engram_heads_per_order=2,
                                 engram_dim_per_order=8, engram_table_size=[10, 10], pad_token_id=0)
    r = multipliers(cfg, 0)
    assert len(r) == 3 and all(x % 2 == 1 and 0 < x < 2**63 // cfg.vocab_size for x in r)
    assert r == multipliers(cfg, 0) and r != multipliers(cfg, 1)  # deterministic, per layer
    ids = [7, 4000, 13, 7]
    sizes = [11, 13, 17, 19]
    want = []
    for t in range(len(ids)):
        x = [ids[t - j] if t - j >= 0 else 0 for j in range(3)]
        m2 = (x[0] * r[0]) ^ (x[1] * r[1])
        m3 = m2 ^ (x[2] * r[2])
        want.append([m2 % 11, m2 % 13, m3 % 17, m3 % 19])
    hist = torch.tensor([[[ids[t - k] if t - k >= 0 else 0 for k in (1, 2)] for t in range(4)]])
    got = ngram_hashes(torch.tensor([ids]), hist, r, sizes, heads_per_order=2)
    assert got[0].tolist() == want


def test_same_ngram_same_slots():
    """Wherever a trigram occurs (other batch row, other position, other prefix) its order-3 slots
    are the same; a shared bigram shares the order-2 slots only; and another model built from the
    same config hashes identically."""
    m = _model()
    H = m.config.engram_heads_per_order
    seen = {}
    orig = Engram.lookup

    def spy(self, slots, device, dtype):
        seen[self.layer_idx] = slots
        return orig(self, slots, device, dtype)

    Engram.lookup = spy
    try:
        ids = torch.tensor([[5, 9, 11, 12, 100, 9, 11, 12, 3], [77, 78, 1, 2, 9, 11, 12, 40, 11]])
        with torch.no_grad():
            m(ids)
        s = seen[2]
        trigram = [s[0, 3], s[0, 7], s[1, 6]]  # (9, 11, 12) ending at these positions
        assert all(torch.equal(t, trigram[0]) for t in trigram)
        # (11, 12) bigram only at (0, 3) vs (12, 11) at (1, 8)... compare a shared bigram with different trigram
        ids2 = torch.tensor([[6, 11, 12]])
        with torch.no_grad():
            m(ids2)
        assert torch.equal(seen[2][0, 2, :H], s[0, 3, :H]) and not torch.equal(seen[2][0, 2, H:], s[0, 3, H:])
        other = _model(seed=7)
        with torch.no_grad():
            other(ids)
        assert torch.equal(seen[2], s)
    finally:
        Engram.lookup = orig


def test_zero_gate_is_the_plain_model_exactly():
    m = _model()
    plain = CausalLM(preset("tiny")).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if ".engram." not in k and "engram_hash" not in k})
    ids = torch.randint(0, m.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (m(ids).logits - plain(ids).logits).abs().max() > 1e-3  # the memory does something
        set_gate_scale(m, 0.0)
        assert torch.equal(m(ids).logits, plain(ids).logits)
        ca, cb = allocate_cache(m.config, 2, 24), allocate_cache(plain.config, 2, 24)
        pos = torch.arange(20).expand(2, 20)
        assert torch.equal(m(ids, positions=pos, cache=ca).logits, plain(ids, positions=pos, cache=cb).logits)


@pytest.mark.parametrize("hc_mult", [None, 2])
def test_cached_decode_equals_full_forward(hc_mult):
    """Prefill 3, then one token at a time to 30: n-gram suffixes come from the cached ids and the
    conv's taps t-3, t-6, t-9 from the cached rows and gates (non-zero conv weights)."""
    m = _model(hc_mult=hc_mult)
    B, T = 2, 30
    ids = torch.randint(0, m.config.vocab_size, (B, T))
    cache = allocate_cache(m.config, B, 32)
    with torch.no_grad():
        full = m(ids).logits
        steps = [m(ids[:, :3], positions=torch.arange(3).expand(B, 3), cache=cache).logits]
        for t in range(3, T):
            steps.append(m(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache).logits)
        chunked = allocate_cache(m.config, B, 32)  # and two chunks (prefill continues from the cache)
        two = torch.cat([m(ids[:, :13], positions=torch.arange(13).expand(B, 13), cache=chunked).logits,
                         m(ids[:, 13:], positions=torch.arange(13, T).expand(B, T - 13), cache=chunked).logits], 1)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    assert (two - full).abs().max().item() <= 1e-5


def test_tables_on_another_device_and_dtype():
    """The tables kept apart from the model (here: float64 'host' copies on CPU next to a float32
    model; no GPU on this machine, so this proves the gather-then-move path and the dtype boundary,
    not an actual PCIe copy): identical outputs and gradients that reach the tables; every table is
    read only by one gather of the needed rows, all before the first block runs."""
    m = _model()
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = m(ids).logits
    place_tables(m, "cpu", dtype=torch.float64)
    tables = [e.table.weight for e in m.modules() if isinstance(e, Engram)]
    assert all(t.dtype == torch.float64 for t in tables) and m.lm_head.weight.dtype == torch.float32
    events = []
    m.model.layers[0].register_forward_pre_hook(lambda *a: events.append("block0"))
    orig = Engram.lookup

    def spy(self, slots, device, dtype):
        rows = orig(self, slots, device, dtype)
        events.append(("rows", self.layer_idx, tuple(rows.shape), rows.dtype))
        return rows

    Engram.lookup = spy
    try:
        with torch.no_grad():
            out = m(ids).logits
    finally:
        Engram.lookup = orig
    assert torch.equal(out, ref)
    assert events == [("rows", 0, (2, 16, 128), torch.float32), ("rows", 2, (2, 16, 128), torch.float32), "block0"]
    m.train()
    m(ids, labels=ids).loss.backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float64 and t.grad.abs().sum() > 0 for t in tables)


def test_compression_map():
    decoded = ["Hello", "hello", " hello", "HÉLLO", "\ufffd", "\ufffd", " ", "  ", "x"]
    raw = ["Hello", "hello", "Ġhello", "HÉLLO", "<0xE2>", "<0x80>", "Ġ", "ĠĠ", "x"]
    assert build_compression_map(decoded, raw) == [0, 0, 0, 0, 1, 2, 3, 3, 4]
    m = _model(engram_compress=True)
    mapping = list(range(m.config.vocab_size))
    mapping[50] = 40  # token 50 now hashes as 40
    set_compression_map(m, mapping)
    seen = {}
    orig = Engram.lookup
    Engram.lookup = lambda self, s, d, t: seen.setdefault(len(seen), s) is None or orig(self, s, d, t)
    try:
        with torch.no_grad():
            m(torch.tensor([[3, 40, 7]]))
            m(torch.tensor([[3, 50, 7]]))
    finally:
        Engram.lookup = orig
    assert torch.equal(seen[0], seen[2])  # layer 0 slots identical for the two sequences
    with pytest.raises(ValueError, match="entries"):
        set_compression_map(m, [0, 1])


def test_checkpoint_round_trip_and_export_refusal(tmp_path):
    """An Engram + mHC + DSA model saves and loads back bit-exactly (config.json says model_type
    'moonlet', which transformers refuses outright); an export for transformers is refused with
    every reason listed and nothing written."""
    m = _model(hc_mult=2, engram_compress=True, model_type="deepseek_v32", index_n_heads=4, index_head_dim=32,
               index_topk=8)
    cfg = m.config
    mapping = torch.arange(cfg.vocab_size)
    mapping[7] = 3
    set_compression_map(m, mapping)
    save_pretrained(m, tmp_path / "ck")
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert d["model_type"] == "moonlet" and d["moonlet_base_model_type"] == "deepseek_v32"
    assert d["engram_layers"] == [0, 2] and d["hc_mult"] == 2 and d["index_topk"] == 8
    m2 = from_pretrained(tmp_path / "ck")
    assert m2.config.to_hf_dict() == m.config.to_hf_dict()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    ids = torch.randint(0, cfg.vocab_size, (1, 25))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="moonlet"):
        transformers.AutoConfig.from_pretrained(tmp_path / "ck")
    assert len(hf_export_blockers(m.config)) == 2
    with pytest.raises(HFExportError, match="hc_mult=2.*\n.*engram_layers"):
        save_pretrained(m, tmp_path / "hf", for_transformers=True)
    assert not (tmp_path / "hf").exists()
    assert hf_export_blockers(preset("tiny")) == []


def test_config_validation_and_accounting():
    d = _cfg().to_hf_dict()
    assert ModelConfig.from_hf_dict(d).to_hf_dict() == d
    assert not any(k.startswith("engram") for k in preset("tiny").to_hf_dict())
    for bad, msg in [(dict(engram_layers=[4]), "< num_hidden_layers"), (dict(engram_layers=[1, 1]), "repeats"),
                     (dict(engram_dim_per_order=30), "divisible"), (dict(engram_table_size=[5]), "list of 2"),
                     (dict(engram_max_ngram=1), "engram_max_ngram"), (dict(engram_layers=[]), "empty")]:
        with pytest.raises(ConfigError, match=msg):
            _cfg(**bad)
    for hc in (None, 3):
        cfg = _cfg(hc_mult=hc)
        m = CausalLM(cfg)
        p = engram_params(cfg)
        tables = sum(e.table.weight.numel() for e in m.modules() if isinstance(e, Engram))
        engram_all = sum(x.numel() for n, x in m.named_parameters() if ".engram." in n)
        assert p["tables"] == tables and p["total"] == engram_all
        assert p["tables"] == (sum(table_sizes(cfg)[0]) + sum(table_sizes(cfg)[2])) * 16
