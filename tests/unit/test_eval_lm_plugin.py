"""The ``nemodiff`` lm-eval model in-process on a tiny random model: exact likelihoods, stops, counts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval")

from nemodiff_train.decoding import generate  # noqa: E402
from nemodiff_train.decoding.config import DecodeConfig  # noqa: E402
from tests.helpers.tiny_run import make_model_dir  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from nemodiff_train.eval.lm_eval_plugin import NemoDiffLM

    root = tmp_path_factory.mktemp("plugin")
    make_model_dir(root / "model")
    # "device" twice (model args and lm-eval's CLI-wide default) must not clash; cuda falls back to cpu.
    return NemoDiffLM.create_from_arg_string(
        f"pretrained={root / 'model'},mode=linear_spec,block_size=4,max_gen_toks=6,stats_out={root / 'stats.json'},"
        "device=cpu", {"device": "cuda:0", "batch_size": 2, "max_batch_size": None})


def _req(*args):
    return SimpleNamespace(args=args)


def _reference_logprob(lm, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm.dlm.hf(input_ids=ids).logits[0].float(), -1)
    n = len(ctx_ids)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont_ids))


def test_registered_under_nemodiff(lm):
    from lm_eval.api.registry import get_model

    from nemodiff_train.eval.lm_eval_plugin import NemoDiffLM

    assert get_model("nemodiff") is NemoDiffLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models stay reachable
    assert lm.batch_size == 2 and lm.device.type == "cpu" and lm.block_size == 4


def test_loglikelihood_is_the_causal_sum(lm):
    reqs = [_req("The quick brown", " fox jumps"), _req("Hello", " world! How are you"), _req("", "Hello world")]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (logprob, greedy) in zip([r.args for r in reqs], got):
        if ctx:
            ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        else:
            ctx_ids, cont_ids = [lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False)
        assert logprob == pytest.approx(_reference_logprob(lm, ctx_ids, cont_ids), abs=1e-4)
        assert isinstance(greedy, bool)


def test_is_greedy_true_for_the_argmax_continuation(lm):
    ctx = lm.tok_encode("The quick brown fox")
    with torch.no_grad():
        nxt = int(lm.dlm.hf(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    ((_, greedy),) = lm._loglikelihood_tokens([(None, ctx, [nxt])])
    assert greedy


def test_loglikelihood_rolling_sums_every_token(lm):
    text = "Diffusion language models denoise masked tokens in parallel."
    (got,) = lm.loglikelihood_rolling([_req(text)])
    ids = lm.tok_encode(text, add_special_tokens=False)
    assert got == pytest.approx(_reference_logprob(lm, [lm.prefix_token_id], ids), abs=1e-4)


def test_generate_until_matches_ar_greedy_cuts_stops_and_counts(lm, tmp_path):
    before = lm.totals.requests
    contexts = ["Q: What is 2 + 2?\nA:", "Hello"]
    outs = lm.generate_until([_req(c, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}) for c in contexts])
    cfg = DecodeConfig(max_new_tokens=6, block_size=4, eos_token_ids=lm.eos_ids)
    ref = generate(lm.lm, [lm.tok_encode(c) for c in contexts], "ar", cfg)
    for out, r in zip(outs, ref):
        assert out == lm.tok_decode(r.tokens).split("\n")[0]  # linear spec == AR greedy, cut at the stop
    assert lm.totals.requests == before + 2 and lm.totals.forwards > 0
    info = lm.get_model_info()["nemodiff"]
    assert info["mode"] == "linear_spec" and info["decode_stats"]["tpf_note"] == "prefill forwards excluded"
    assert json.loads(lm.stats_out.read_text())["decode_stats"]["requests"] == lm.totals.requests


def test_cut_at_stops():
    from nemodiff_train.eval.lm_eval_plugin import _cut_at_stops

    assert _cut_at_stops("a\nb</s>c", ["</s>", "\n"]) == "a"
    assert _cut_at_stops("abc", []) == "abc"
    assert _cut_at_stops("abc", [""]) == "abc"
