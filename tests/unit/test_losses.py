"""Loss parts equal a hand computation; chunking and checkpointing change nothing."""

import math

import pytest
import torch
import torch.nn.functional as F

from nemodiff_train.core.losses import LossWeights, ar_targets, joint_loss_parts, weighted_ce_sum

pytestmark = pytest.mark.unit


def test_joint_loss_parts_by_hand():
    V, L = 5, 3
    x0 = torch.tensor([[1, 2, 3]])
    logits = torch.randn(1, 2 * L, V)  # head = identity: hidden are the logits
    masked = torch.tensor([[True, False, True]])
    p = torch.tensor([[0.5, 0.5, 0.5]])
    parts = joint_loss_parts(logits, lambda h: h, x0, masked, p, torch.ones(1, L, dtype=torch.bool))

    def ce(row, target):
        return -torch.log_softmax(row, -1)[target].item()

    diff = (ce(logits[0, 0], 1) + ce(logits[0, 2], 3)) / 0.5  # unshifted, 1/p weighted
    ar = ce(logits[0, 3], 2) + ce(logits[0, 4], 3)  # clean logit i predicts x0[i+1]
    assert math.isclose(parts.diffusion_sum.item(), diff, rel_tol=1e-5)
    assert math.isclose(parts.ar_sum.item(), ar, rel_tol=1e-5)
    assert parts.diffusion_count.item() == 2 and parts.ar_count.item() == 2
    w = LossWeights(alpha=0.3, beta=1.0)
    total = (parts.numerator(w) / parts.denominator(w)).item()
    assert math.isclose(total, (0.3 * diff + ar) / (2 + 2), rel_tol=1e-5)


def test_ar_targets_respect_loss_mask_and_documents():
    x0 = torch.tensor([[10, 11, 12, 13, 14]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1]])
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    targets, sup = ar_targets(x0, loss_mask, docs)
    assert targets[0, :4].tolist() == [11, 12, 13, 14]
    # position 1 predicts 12 (supervised); 2 would predict 13 across the document boundary
    assert sup.tolist() == [[False, True, False, True, False]]


def test_weighted_ce_sum_chunked_and_checkpointed_matches_plain():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(37, 8, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    weights = torch.rand(37) + 0.5
    ref = (F.cross_entropy(head(hidden), targets, reduction="none") * weights).sum()
    ref.backward()
    g_ref, gw_ref = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None
    got = weighted_ce_sum(hidden, targets, weights, head, chunk_size=8)
    got.backward()
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(hidden.grad, g_ref, atol=1e-5)
    assert torch.allclose(head.weight.grad, gw_ref, atol=1e-5)


def test_no_masked_positions_gives_zero_with_graph():
    h = torch.randn(1, 4, 3, requires_grad=True)
    parts = joint_loss_parts(h, lambda x: x, torch.tensor([[0, 1]]), torch.zeros(1, 2, dtype=torch.bool),
                             torch.full((1, 2), 0.5), torch.ones(1, 2, dtype=torch.bool))
    assert parts.diffusion_sum.item() == 0 and parts.diffusion_count.item() == 0
    (parts.diffusion_sum + parts.ar_sum).backward()


def test_loss_weights_validation():
    with pytest.raises(ValueError):
        LossWeights(alpha=-1)


def test_masked_token_stats_by_hand_and_bucket_edges():
    from nemodiff_train.core.losses import masked_token_stats

    V, L = 6, 4
    x0 = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])
    hidden = torch.randn(2, 2 * L, V)
    hidden[0, 0, 1] = 50.0  # a certain, correct fill
    masked = torch.tensor([[True, True, False, True], [True, False, True, True]])
    # per-position p straddling every edge: 0.25 opens the second bucket, 1.0 closes the last
    p = torch.tensor([[0.1, 0.25, 0.3, 0.5], [0.74, 0.2, 0.75, 1.0]])
    stats = masked_token_stats(hidden, x0, masked, p, lambda h: h, chunk_size=2)
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(L):
            if not masked[b, i]:
                continue
            row = hidden[b, i]
            bucket = min(int(p[b, i] // 0.25), 3)
            expected[bucket, 0] += F.cross_entropy(row[None], x0[b, i][None]).item()
            expected[bucket, 1] += float(row.argmax() == x0[b, i])
            expected[bucket, 2] += 1
    assert torch.allclose(stats, expected, atol=1e-5)
    assert stats[:, 2].tolist() == [1.0, 1.0, 2.0, 2.0] and stats[0, 1] == 1.0
