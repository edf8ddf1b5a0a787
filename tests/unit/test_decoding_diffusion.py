"""Block diffusion on a scripted model: exactly the positions the commit rule names are committed, the
forward count is exact, TPF <= B/2 (docs/decoding.md, "Block diffusion"); plus the mask ban for every mode."""

import pytest
import torch

from nemodiff_train.decoding import MODES, DecodeConfig, diffusion_generate, generate
from nemodiff_train.decoding.diffusion import select_commits
from tests.helpers.decoding import ScriptedLM, one_thread, peaked_logits, random_prompts, tiny_lm  # noqa: F401

pytestmark = pytest.mark.unit

V, MASK, EOS = 32, 1, 2
PROMPT = [5, 6]


def scripted(seeds, plan):
    """Causal call i predicts ``seeds[i]`` at its last position; bidirectional call i gives block position
    p the candidate/confidence ``plan[i][p]`` (positions not in the plan: token 31, confidence 0.01)."""
    counters = {"causal": 0, "bidir": 0}

    def script(call):
        b, q = call.input_ids.shape
        if call.write_cache:
            out = torch.zeros(b, q, V)
            out[:, -1] = peaked_logits(V, seeds[counters["causal"]], 0.99, MASK)
            counters["causal"] += 1
            return out
        step = plan[counters["bidir"]]
        counters["bidir"] += 1
        rows = [peaked_logits(V, *step.get(p, (31, 0.01)), MASK) for p in range(q)]
        return torch.stack(rows)[None].expand(b, q, V).clone()

    return ScriptedLM(script, V, MASK)


def kinds(lm):
    return ["causal" if c.write_cache else "bidir" for c in lm.calls]


def test_threshold_rule_commits_exactly_the_named_positions():
    plan = [{1: (11, 0.5), 2: (12, 0.6), 3: (13, 0.3)},     # none >= 0.9: only the most confident (2)
            {1: (11, 0.92), 3: (13, 0.95)},                 # both >= 0.9
            {1: (21, 0.91), 2: (22, 0.99), 3: (23, 0.9)}]   # block 2: all at once (0.9 >= tau counts)
    lm = scripted([10, 20, 30], plan)
    res = diffusion_generate(lm, [PROMPT], DecodeConfig(max_new_tokens=8, block_size=4, threshold=0.9),
                             return_cache=True)[0]
    assert res.tokens == [10, 11, 12, 13, 20, 21, 22, 23]
    assert kinds(lm) == ["causal", "bidir", "bidir", "causal", "bidir", "causal"]
    assert lm.calls[2].input_ids.tolist() == [[10, MASK, 12, MASK]]          # step 2 sees step 1's commit
    assert lm.calls[1].position_ids.tolist() == [[2, 3, 4, 5]] and lm.calls[4].position_ids.tolist() == [[6, 7, 8, 9]]
    assert lm.calls[1].attention_mask.all()                                   # bidirectional over cache + block
    assert torch.equal(lm.calls[3].attention_mask[0, :, 2:], torch.ones(4, 4, dtype=torch.bool).tril())
    assert all(c.cache_length == 2 for c in lm.calls[1:4])                     # denoising never writes the cache
    s = res.stats
    assert (s.prefill_forwards, s.forwards, s.committed_per_forward) == (1, 5, [1, 2, 1, 3, 0])
    assert s.tpf == 8 / 5 <= 4 / 2 and s.finished_by == "length"
    assert res.cache[0][0].flatten().tolist() == [5, 6, 10, 11, 12, 13, 20, 21, 22, 23]  # prompt + causal blocks


def test_fixed_steps_commit_an_even_split():
    plan = [{1: (11, 0.3), 2: (12, 0.5), 3: (13, 0.4)}, {1: (11, 0.2)}]  # ceil(3/2) = 2, then 1
    lm = scripted([10, 20], plan)
    res = diffusion_generate(lm, [PROMPT], DecodeConfig(max_new_tokens=4, block_size=4, threshold=None,
                                                        steps_per_block=2))[0]
    assert res.tokens == [10, 11, 12, 13] and res.stats.committed_per_forward == [2, 1, 0]
    assert lm.calls[2].input_ids.tolist() == [[10, MASK, 12, 13]]
    # default budget = B steps: 3 masks over 4 steps -> one per step
    lm = scripted([10, 20], [{1: (11, 0.3), 2: (12, 0.5), 3: (13, 0.4)}] * 3)
    res = diffusion_generate(lm, [PROMPT], DecodeConfig(max_new_tokens=4, block_size=4, threshold=None))[0]
    assert res.stats.committed_per_forward == [1, 1, 1, 0] and res.tokens == [10, 11, 12, 13]


def test_eos_stops_denoising_once_nothing_is_masked_before_it():
    eos = DecodeConfig(max_new_tokens=8, block_size=4, eos_token_ids=(EOS,))
    lm = scripted([10, 20], [{1: (11, 0.95), 2: (EOS, 0.97), 3: (13, 0.2)}])
    res = diffusion_generate(lm, [PROMPT], eos)[0]
    assert res.tokens == [10, 11, EOS] and res.stats.finished_by == "eos"
    assert kinds(lm) == ["causal", "bidir", "causal"] and res.stats.committed_per_forward == [2, 0]
    assert lm.calls[2].input_ids.tolist() == [[10, 11, EOS, MASK]]  # the mask right of EOS is never filled
    # a mask left of the EOS keeps the block denoising
    lm = scripted([10, 20], [{1: (11, 0.3), 2: (EOS, 0.97), 3: (13, 0.2)}, {1: (11, 0.5), 3: (13, 0.4)}])
    res = diffusion_generate(lm, [PROMPT], eos)[0]
    assert res.tokens == [10, 11, EOS] and res.stats.committed_per_forward == [1, 1, 0]
    # an EOS seed ends the output without any denoising pass
    lm = scripted([EOS, 9], [])
    res = diffusion_generate(lm, [PROMPT], eos)[0]
    assert res.tokens == [EOS] and kinds(lm) == ["causal", "causal"] and res.stats.forwards == 1


def test_last_block_is_only_as_long_as_the_remaining_budget():
    full = {p: (10 + p, 0.99) for p in range(4)}
    lm = scripted([10, 20, 30], [full, full])
    res = diffusion_generate(lm, [PROMPT], DecodeConfig(max_new_tokens=6, block_size=4))[0]
    assert [c.input_ids.shape[1] for c in lm.calls] == [2, 4, 4, 2, 2]
    assert res.tokens == [10, 11, 12, 13, 20, 11] and res.stats.forwards == 4


def test_select_commits_rule():
    conf = torch.tensor([[0.0, 0.5, 0.95, 0.91], [0.0, 0.2, 0.3, 0.1]])
    masked = torch.tensor([[False, True, True, True], [False, True, True, True]])
    assert select_commits(conf, masked, 0.9, 1).tolist() == [[False, False, True, True], [False, False, True, False]]
    assert select_commits(conf, masked, None, 2).tolist() == [[False, False, True, True], [False, True, True, False]]
    none = torch.zeros_like(masked)
    assert not select_commits(conf, none, 0.9, 1).any() and not select_commits(conf, none, None, 1).any()


def test_prefix_rule_commits_only_the_leftmost_passing_run():
    conf = torch.tensor([[0.0, 0.95, 0.5, 0.99, 0.97],    # 0.5 at position 2 blocks the confident 3 and 4
                         [0.0, 0.2, 0.3, 0.99, 0.1],      # none passes on the left: the leftmost mask only
                         [0.0, 0.93, 0.0, 0.91, 0.4],     # position 2 is committed already: it blocks nothing
                         [0.0, 0.0, 0.0, 0.0, 0.0]])      # no mask: nothing
    masked = torch.tensor([[False, True, True, True, True], [False, True, True, True, True],
                           [False, True, False, True, True], [False] * 5])
    assert select_commits(conf, masked, 0.9, 1, "prefix").tolist() == [
        [False, True, False, False, False], [False, True, False, False, False],
        [False, True, False, True, False], [False] * 5]
    # the method's rule on the same rows commits the confident positions right of the gap
    assert select_commits(conf, masked, 0.9, 1).tolist()[0] == [False, True, False, True, True]
    # fixed steps: the k = ceil(masks / steps_left) leftmost masks, whatever their confidence
    assert select_commits(conf, masked, None, 2, "prefix").tolist() == [
        [False, True, True, False, False], [False, True, True, False, False],
        [False, True, False, True, False], [False] * 5]


def test_prefix_rule_fills_a_block_left_to_right():
    """The method's rule commits the confident far position first; the prefix rule waits for the masks on
    its left and never commits a token right of a mask."""
    plan = [{1: (11, 0.5), 2: (12, 0.6), 3: (13, 0.99)},   # 3 is confident, 1 and 2 are not
            {2: (12, 0.95), 3: (13, 0.99)},
            {}]
    lm = scripted([10, 20], plan)
    cfg = DecodeConfig(max_new_tokens=4, block_size=4, threshold=0.9, commit_rule="prefix")
    res = diffusion_generate(lm, [PROMPT], cfg)[0]
    assert lm.calls[2].input_ids.tolist() == [[10, 11, MASK, MASK]]   # step 1 forced the leftmost, not 3
    assert res.tokens == [10, 11, 12, 13] and res.stats.committed_per_forward == [1, 2, 0]
    lm = scripted([10, 20], plan)
    diffusion_generate(lm, [PROMPT], DecodeConfig(max_new_tokens=4, block_size=4, threshold=0.9))
    assert lm.calls[2].input_ids.tolist() == [[10, MASK, MASK, 13]]  # the method's rule: 3 first


def test_prefix_ar_ends_a_block_where_no_mask_reaches_tau():
    """With ``prefix_ar`` a pass whose leftmost mask is below τ commits nothing: the block ends at its
    committed prefix, the causal pass keeps only that prefix in the cache, and its last position's AR
    token starts the next block (at the next position, not at the old block's end)."""
    seeds, plan = [10, 20, 30], [{1: (11, 0.95), 2: (12, 0.5), 3: (13, 0.99)},   # commits 1 only
                                 {2: (12, 0.4), 3: (13, 0.99)},                  # 2 below tau: the block ends
                                 {1: (21, 0.97), 2: (22, 0.96), 3: (23, 0.91)}]  # next block: all at once
    counters = {"causal": 0, "bidir": 0}

    def script(call):  # a causal call predicts its seed at EVERY position (the block may end anywhere)
        b, q = call.input_ids.shape
        if call.write_cache:
            counters["causal"] += 1
            return peaked_logits(V, seeds[counters["causal"] - 1], 0.99, MASK)[None, None].expand(b, q, V).clone()
        step = plan[counters["bidir"]]
        counters["bidir"] += 1
        return torch.stack([peaked_logits(V, *step.get(p, (31, 0.01)), MASK) for p in range(q)])[None].expand(b, q, V).clone()

    lm = ScriptedLM(script, V, MASK)
    res = diffusion_generate(lm, [PROMPT], DecodeConfig(max_new_tokens=6, block_size=4, threshold=0.9,
                                                        commit_rule="prefix_ar"))[0]
    assert res.tokens == [10, 11, 20, 21, 22, 23]
    assert kinds(lm) == ["causal", "bidir", "bidir", "causal", "bidir", "causal"]
    assert lm.calls[3].input_ids.tolist() == [[10, 11, MASK, MASK]]   # the causal pass sees the ended block
    assert lm.calls[4].input_ids.tolist() == [[20, MASK, MASK, MASK]]
    assert lm.calls[4].position_ids.tolist() == [[4, 5, 6, 7]]       # the next block starts after 10, 11
    assert lm.calls[4].cache_length == 4                              # prompt + the kept prefix only
    assert res.stats.committed_per_forward == [1, 0, 1, 3, 0]


def test_unknown_commit_rule_is_refused():
    with pytest.raises(ValueError, match="commit_rule must be one of"):
        DecodeConfig(commit_rule="left")
    with pytest.raises(ValueError, match="needs a threshold"):
        DecodeConfig(commit_rule="prefix_ar", threshold=None)


@pytest.mark.parametrize("block", [2, 4, 8])
def test_tpf_never_exceeds_half_the_block(block):
    always_sure = {p: (7, 0.999) for p in range(block)}
    lm = scripted([9] * 20, [always_sure] * 20)
    res = diffusion_generate(lm, [PROMPT], DecodeConfig(max_new_tokens=4 * block, block_size=block))[0]
    assert res.stats.tpf == block / 2  # the best case: one denoising pass + one causal pass per block
    real = tiny_lm("qwen3", tie=False, initializer_range=1.0)
    for thr, steps in [(0.9, None), (0.0, None), (None, 1), (None, None)]:
        cfg = DecodeConfig(max_new_tokens=3 * block + 1, block_size=block, threshold=thr, steps_per_block=steps)
        for r in diffusion_generate(real, random_prompts(block, 2), cfg):
            assert r.stats.tpf <= block / 2 and len(r.tokens) == cfg.max_new_tokens
            assert real.mask_token_id not in r.tokens


@pytest.mark.parametrize("mode", sorted(MODES))
def test_no_mode_ever_emits_the_mask_token(mode):
    # a bigram model whose largest logit is always [MASK]: causal -> (token + 1), bidirectional -> (token + 2)
    def script(call):
        shift = 1 if call.write_cache else 2
        ids = (call.input_ids + shift) % V
        ids[ids == MASK] = 4
        return torch.stack([torch.stack([peaked_logits(V, int(t), 0.6, MASK) for t in row]) for row in ids])

    lm = ScriptedLM(script, V, MASK)
    cfg = DecodeConfig(max_new_tokens=9, block_size=4, temperature=0.0)
    res = generate(lm, [[30, 31], [29]], mode, cfg)
    assert all(len(r.tokens) == 9 and MASK not in r.tokens for r in res)
    sampled = generate(lm, [[30, 31]], mode, DecodeConfig(max_new_tokens=9, block_size=4, temperature=2.0))
    assert MASK not in sampled[0].tokens
