"""model/loss.py: the chunked cross-entropy against F.cross_entropy and against hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_mgt.model import lm_loss
from megatron_mgt.model import loss as loss_module


def test_uniform_logits_give_log_vocab_and_the_hand_gradient():
    """z = 0 everywhere: L = log V; dL/dz = (1/V - onehot) / N."""
    rows, vocab = 4, 10
    logits = torch.zeros(rows, vocab, requires_grad=True)
    targets = torch.tensor([0, 3, 9, 3])
    loss = lm_loss(logits, targets)
    assert loss.item() == pytest.approx(math.log(vocab), rel=1e-6)
    loss.backward()
    expected = torch.full((rows, vocab), 1 / vocab)
    expected[torch.arange(rows), targets] -= 1
    torch.testing.assert_close(logits.grad, expected / rows)


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_f_cross_entropy_over_uneven_chunks_with_ignored_targets(monkeypatch, chunk_rows, dtype):
    vocab = 37
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * vocab * chunk_rows)  # chunk_rows rows per chunk
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, vocab, generator=gen)).to(dtype)
    targets = torch.randint(0, vocab, (2, 5), generator=gen)
    targets[0, 1] = targets[1, 4] = loss_module.IGNORE_INDEX
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = lm_loss(ours_in, targets)
    ref = F.cross_entropy(ref_in.float().reshape(-1, vocab), targets.reshape(-1))
    (2.5 * ours).backward()
    (2.5 * ref).backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours_in.grad.dtype == dtype
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), rtol=1e-5, atol=1e-7 if dtype == torch.float32 else 1e-3)
    assert ours_in.grad[0, 1].abs().max() == 0  # an ignored target gets no gradient


def test_every_target_ignored_gives_nan_and_zero_gradient_as_f_cross_entropy():
    ours, ref = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    targets = torch.full((3,), loss_module.IGNORE_INDEX)
    loss, ref_loss = lm_loss(ours, targets), F.cross_entropy(ref, targets)
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    loss.backward()
    ref_loss.backward()
    assert torch.equal(ours.grad, torch.zeros(3, 5)) and torch.equal(ref.grad, torch.zeros(3, 5))


def test_targets_that_do_not_match_the_rows_are_refused():
    with pytest.raises(ValueError, match="one target per row"):
        lm_loss(torch.randn(5, 7), torch.tensor([2]))  # would broadcast silently
    with pytest.raises(ValueError, match="one target per row"):
        lm_loss(torch.randn(2, 3, 7), torch.zeros(2, 4, dtype=torch.long))


def test_double_backward_is_refused():
    logits = torch.randn(4, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(lm_loss(logits, torch.tensor([0, 1, 2, 3])), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|second"):
        grad.sum().backward()
