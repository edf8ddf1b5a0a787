"""The soft-target terms (core/distill_losses.py) against a dense, loop-by-loop reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemodiff_train.core.distill_losses import DistillWeights, Teacher, joint_and_soft_target_parts
from nemodiff_train.core.losses import ar_targets, joint_loss_parts

pytestmark = pytest.mark.unit

V, D = 11, 6


def _case(seed=0, b=2, length=9):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, 2 * length, D, generator=g, requires_grad=True)
    w_head = torch.randn(V, D, generator=g)
    head = lambda h: h @ w_head.T  # noqa: E731
    x0 = torch.randint(0, V, (b, length), generator=g)
    loss_mask = torch.ones(b, length, dtype=torch.bool)
    loss_mask[0, :2] = False  # a prompt
    doc_ids = torch.zeros(b, length, dtype=torch.long)
    doc_ids[1, 5:] = 1  # a packed second document
    masked = (torch.rand(b, length, generator=g) < 0.6) & loss_mask
    masked[1, 5] = True  # a document's first token: no AR prediction
    masked[0, 2] = True  # first supervised token after the prompt: its AR prediction sits in the prompt
    mask_prob = torch.full((b, length), 0.6)
    teacher_h = torch.randn(b, length, D, generator=g)
    w_teacher = torch.randn(V, D, generator=g)
    return hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, Teacher(teacher_h, lambda h: h @ w_teacher.T)


def _reference(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, teacher, temperature):
    """Position by position, full logits, no chunking."""
    b, length = x0.shape
    logits = head(hidden)
    noisy, clean = logits[:, :length], logits[:, length:]
    kl = cert = tkl = torch.zeros(())
    n_kl = n_cert = n_t = 0
    for r in range(b):
        for i in range(length):
            if masked[r, i]:
                q = F.log_softmax(noisy[r, i], -1)
                if i > 0 and doc_ids[r, i - 1] == doc_ids[r, i] and loss_mask[r, i]:
                    p = F.log_softmax(clean[r, i - 1].detach(), -1)
                    kl = kl + (p.exp() * (p - q)).sum()
                    n_kl += 1
                if noisy[r, i].argmax() == x0[r, i]:
                    qt = F.log_softmax(noisy[r, i] / temperature, -1)
                    cert = cert - (qt.exp() * qt).sum()
                    n_cert += 1
            if i < length - 1 and loss_mask[r, i + 1] and doc_ids[r, i + 1] == doc_ids[r, i]:
                p = F.log_softmax(teacher.head(teacher.hidden[r, i]), -1)
                tkl = tkl + (p.exp() * (p - F.log_softmax(clean[r, i], -1))).sum()
                n_t += 1
    return kl, n_kl, cert, n_cert, tkl, n_t


@pytest.mark.parametrize("chunk_size", [3, 2048])  # chunked + recomputed in backward, and one chunk
def test_terms_equal_the_dense_reference(chunk_size):
    hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, teacher = _case()
    w = DistillWeights(drafter_kl=0.5, certainty=0.25, certainty_temperature=0.7, teacher_kl=2.0)
    parts, terms = joint_and_soft_target_parts(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, w, teacher,
                                               chunk_size)
    kl, n_kl, cert, n_cert, tkl, n_t = _reference(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, teacher, 0.7)
    assert n_kl > 0 and n_cert > 0 and n_t > 0
    torch.testing.assert_close(terms["drafter_kl"][0], kl)
    torch.testing.assert_close(terms["certainty"][0], cert)
    torch.testing.assert_close(terms["teacher_kl"][0], tkl)
    # counts: positions with an AR prediction, every masked position, every AR target
    assert int(terms["drafter_kl"][1]) == n_kl and int(terms["certainty"][1]) == int(masked.sum())
    assert int(terms["teacher_kl"][1]) == n_t
    plain = joint_loss_parts(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, chunk_size)
    for a, b in zip((parts.diffusion_sum, parts.diffusion_count, parts.ar_sum, parts.ar_count),
                    (plain.diffusion_sum, plain.diffusion_count, plain.ar_sum, plain.ar_count)):
        torch.testing.assert_close(a, b)  # the one-pass CE is the same joint loss


def test_gradients_match_and_the_ar_view_is_only_a_target():
    hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, teacher = _case(seed=1)
    w = DistillWeights(drafter_kl=1.0)
    _, terms = joint_and_soft_target_parts(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, w, None, 3)
    (grad,) = torch.autograd.grad(terms["drafter_kl"][0], hidden)
    length = x0.shape[1]
    assert grad[:, length:].abs().max() == 0  # no gradient into the clean (AR) stream: it is the target
    assert grad[:, :length].abs().max() > 0
    kl = _reference(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, teacher, 1.0)[0]
    (ref,) = torch.autograd.grad(kl, hidden)
    torch.testing.assert_close(grad, ref)


def test_certainty_gradient_lowers_entropy_only_where_right():
    hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, _ = _case(seed=2)
    w = DistillWeights(certainty=1.0)
    _, terms = joint_and_soft_target_parts(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, w)
    (grad,) = torch.autograd.grad(terms["certainty"][0], hidden)
    length = x0.shape[1]
    right = head(hidden[:, :length]).argmax(-1) == x0
    touched = grad[:, :length].abs().sum(-1) > 0
    assert torch.equal(touched, masked & right)


def test_no_terms_is_the_plain_loss():
    hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, _ = _case(seed=3)
    plain = joint_loss_parts(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, 4)
    parts, terms = joint_and_soft_target_parts(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids,
                                               DistillWeights(), None, 4)
    assert terms == {} and torch.equal(parts.diffusion_sum, plain.diffusion_sum)
    assert DistillWeights(drafter_kl=1.0, teacher_kl=0.5).terms() == {"drafter_kl": 1.0, "teacher_kl": 0.5}


def test_teacher_kl_needs_a_teacher_and_weights_are_checked():
    hidden, head, x0, masked, mask_prob, loss_mask, doc_ids, _ = _case()
    with pytest.raises(ValueError, match="teacher"):
        joint_and_soft_target_parts(hidden, head, x0, masked, mask_prob, loss_mask, doc_ids,
                                    DistillWeights(teacher_kl=1.0))
    with pytest.raises(ValueError, match="drafter_kl"):
        DistillWeights(drafter_kl=-1.0)
    with pytest.raises(ValueError, match="certainty_temperature"):
        DistillWeights(certainty_temperature=0.0)
    assert ar_targets(x0, loss_mask, doc_ids)[1].any()
