"""The torch engine's loss seam (engines/torch/loss.py): extra terms join the joint loss as global means.

A term's gradient, accumulated micro-batch by micro-batch with the step's all-reduced counts, must
equal the gradient of ``joint + weight · Σ sum / Σ count`` computed on the whole step at once; and
without terms the objective is exactly the joint loss's ``numerator · world / denominator``.
"""

from __future__ import annotations

import pytest
import torch

from nemodiff_train.core.losses import LossWeights
from nemodiff_train.engines.torch.loss import JointObjective, StepParts, TwoStreamForward, TwoStreamLoss
from nemodiff_train.models.step import collate

pytestmark = pytest.mark.unit


class NoisyLogSumExp:
    """A toy term: logsumexp of the diffusion view's logits at masked positions (an entropy-like term)."""

    name = "lse"

    def __init__(self, weight: float):
        self.weight = weight
        self.seen: list[TwoStreamForward] = []

    def target_count(self, mb) -> float:
        return mb.masked_count

    def __call__(self, fwd: TwoStreamForward):
        self.seen.append(fwd)
        masked = fwd.mb.noise.masked
        return torch.logsumexp(fwd.logits(fwd.noisy_hidden[masked]), -1).sum(), masked.sum().float()


@pytest.fixture(scope="module")
def dlm():
    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.models.hf import load_dlm

    return load_dlm(embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa")


def _micro(dlm, seed: int, rows: int = 2, length: int = 16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (rows, length), generator=g)
    data = [{"input_ids": r, "doc_ids": torch.zeros(length, dtype=torch.long),
             "loss_mask": torch.ones(length, dtype=torch.bool)} for r in ids]
    return collate(data, list(range(seed * rows, seed * rows + rows)), seed=0,
                   mask_token_id=dlm.settings.mask_token_id, schedule="uniform", eps=1e-3, block_size=8,
                   half_life_ratio=0.25)


def _grads(module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    module.zero_grad(set_to_none=True)
    return grads


def test_extra_term_gradient_is_that_of_the_global_mean(dlm):
    term = NoisyLogSumExp(weight=0.5)
    module, objective = TwoStreamLoss(dlm, 8, 64, [term]), JointObjective(LossWeights(1.0, 0.3), [term])
    micro = [_micro(dlm, 1), _micro(dlm, 2)]
    dens = objective.local_denominators(micro)  # one rank: local = global
    assert dens[1] == sum(mb.masked_count for mb in micro) > 0
    total = StepParts.zeros("cpu", ["lse"])
    for mb in micro:
        parts = module(mb)
        objective.backward_scalar(parts, dens, world=1).backward()
        total = total + parts.detached()
    accumulated = _grads(module)

    whole = StepParts.zeros("cpu", ["lse"])
    for mb in micro:
        whole = whole + module(mb)
    s, c = whole.extra["lse"]
    w = objective.weights
    (whole.numerator(w) / whole.denominator(w) + 0.5 * s / c).backward()
    for a, b in zip(accumulated, _grads(module), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    metrics = objective.metrics(total)
    assert metrics["lse_loss"] == pytest.approx((s / c).item(), rel=1e-5)
    joint = (total.numerator(w) / total.denominator(w)).item()
    assert metrics["loss"] == pytest.approx(joint + 0.5 * metrics["lse_loss"], rel=1e-6)
    fwd = term.seen[0]
    length = micro[0].x0.shape[1]
    assert fwd.noisy_hidden.shape[:2] == fwd.clean_hidden.shape[:2] == (2, length)  # both views, [m, L, d]


def test_without_terms_the_objective_is_the_joint_loss_exactly(dlm):
    module, objective = TwoStreamLoss(dlm, 8, 64), JointObjective(LossWeights(1.0, 0.3))
    mb = _micro(dlm, 3)
    parts = module(mb)
    den = mb.masked_count + 0.3 * mb.ar_count
    assert objective.local_denominators([mb]) == [den]
    assert torch.equal(objective.backward_scalar(parts, [2 * den], world=2), parts.numerator(objective.weights) * (2 / (2 * den)))
    assert set(objective.metrics(parts.detached())) == {"loss", "ar_loss", "diffusion_loss", "masked_tokens"}


def test_soft_target_terms_run_fused_with_counts_known_before_the_forward(dlm):
    """diffusion.drafter_kl / certainty / teacher_kl through the engine: each term's count from
    ``target_count`` equals the count its forward returns, and the accumulated gradient is that of the
    global means (the teacher is a frozen copy of the base, never a submodule of the wrapped loss)."""
    from nemodiff_train.assets import embedded_model_dir
    from nemodiff_train.core.distill_losses import DistillWeights
    from nemodiff_train.engines.torch.loss import SoftTargetTerm
    from nemodiff_train.models.hf import load_dlm

    teacher = load_dlm(embedded_model_dir(), dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():  # a teacher that differs from the student, so the teacher KL is not 0
        teacher.hf.get_output_embeddings().weight.mul_(1.5)
    soft = DistillWeights(drafter_kl=0.7, certainty=0.2, certainty_temperature=0.5, teacher_kl=0.4)
    terms = [SoftTargetTerm(n, w) for n, w in soft.terms().items()]
    module = TwoStreamLoss(dlm, 8, 64, terms, soft, teacher)
    assert not any(p is q for p in module.parameters() for q in teacher.parameters())
    objective = JointObjective(LossWeights(1.0, 0.3), terms)
    micro = [_micro(dlm, 4), _micro(dlm, 5)]
    dens = objective.local_denominators(micro)
    total = StepParts.zeros("cpu", [t.name for t in terms])
    for mb in micro:
        parts = module(mb)
        for t in terms:
            assert parts.extra[t.name][1].item() == t.target_count(mb)
        objective.backward_scalar(parts, dens, world=1).backward()
        total = total + parts.detached()
    accumulated = _grads(module)
    assert all(total.extra[t.name][0] > 0 for t in terms)
    whole = StepParts.zeros("cpu", [t.name for t in terms])
    for mb in micro:
        whole = whole + module(mb)
    w = objective.weights
    loss = whole.numerator(w) / whole.denominator(w)
    for t in terms:
        s, c = whole.extra[t.name]
        loss = loss + t.weight * s / c
    loss.backward()
    for a, b in zip(accumulated, _grads(module), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())
