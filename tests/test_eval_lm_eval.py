"""lm-evaluation-harness adapter (skipped unless lm_eval is installed: `pip install -e ".[lm-eval]"`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from _eval_fixtures import TEXT, make_checkpoint  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from moonlet.eval.lm_eval_adapter import MoonletLM  # noqa: E402
from moonlet.eval.perplexity import perplexity  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lmeval") / "ckpt", seed=2)


@pytest.fixture(scope="module")
def lm(ckpt):
    return MoonletLM(checkpoint=str(ckpt), device="cuda")  # falls back to cpu here


def inst(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_matches_manual(lm):
    tok, model = lm.tokenizer, lm.model
    (ll, greedy), = lm.loglikelihood([inst("loglikelihood", "The quick", " brown fox")])
    ctx, whole = tok.encode("The quick"), tok.encode("The quick brown fox")
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    manual = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
    assert ll == pytest.approx(manual, abs=1e-4)
    assert greedy == all(int(logp[i - 1].argmax()) == whole[i] for i in range(len(ctx), len(whole)))
    # is_greedy on token ids: the argmax token is greedy, another one is not
    top2 = logp[len(whole) - 1].topk(2).indices.tolist()
    assert lm._score(whole, [top2[0]])[1] is True and lm._score(whole, [top2[1]])[1] is False


def test_rolling_equals_perplexity_nll(lm):
    text = TEXT[:300]
    (total,) = lm.loglikelihood_rolling([inst("loglikelihood_rolling", text)])
    r = perplexity(lm.model, lm.tokenizer, text, window=1024, stride=512)
    assert total == pytest.approx(-r.nll_sum, rel=1e-5)


def test_generate_until_stops(lm):
    out = lm.generate_until([inst("generate_until", "The quick", {"until": ["\n"], "max_gen_toks": 3})])
    assert isinstance(out[0], str) and "\n" not in out[0]


@pytest.mark.slow
def test_lm_eval_cli_end_to_end(ckpt, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context": c, "target": t}) + "\n"
                            for c, t in [("The quick brown", " fox"), ("To be or not", " to be")]))
    (tmp_path / "moonlet_local.yaml").write_text(
        "task: moonlet_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "moonlet.eval.lm_eval_adapter", "--model", "moonlet",
                        "--model_args", f"checkpoint={ckpt}", "--tasks", "moonlet_local",
                        "--include_path", str(tmp_path), "--batch_size", "1", "--output_path", str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "moonlet_local" in r.stdout and "acc" in r.stdout
    assert list(Path(tmp_path / "res").rglob("results_*.json"))
