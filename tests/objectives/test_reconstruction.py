import math

import pytest
import torch

from medssl.objectives import MaskedReconstructionLoss, masked_reconstruction_loss

# One sample, three tokens of two values; tokens 0 and 2 are masked.
PRED = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
TARGET = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [5.0, 3.0]]])
MASK = torch.tensor([[True, False, True]])


def test_hand_computed_loss():
    # token errors: ((1-1)^2 + (2-0)^2) / 2 = 2 and ((0-5)^2 + (0-3)^2) / 2 = 17; mean over masked tokens
    assert masked_reconstruction_loss(PRED, TARGET, MASK).item() == pytest.approx((2.0 + 17.0) / 2)


def test_hand_computed_loss_with_norm_pix():
    # token 0: mean 0.5, unbiased var 0.5 -> target (+-0.5) / sqrt(0.5 + eps)
    # token 2: mean 4, unbiased var 2 -> target (+-1) / sqrt(2 + eps)
    eps = 1e-6
    t0 = [0.5 / math.sqrt(0.5 + eps), -0.5 / math.sqrt(0.5 + eps)]
    t2 = [1.0 / math.sqrt(2.0 + eps), -1.0 / math.sqrt(2.0 + eps)]
    err0 = ((1 - t0[0]) ** 2 + (2 - t0[1]) ** 2) / 2
    err2 = ((0 - t2[0]) ** 2 + (0 - t2[1]) ** 2) / 2
    loss = masked_reconstruction_loss(PRED, TARGET, MASK, norm_pix=True, eps=eps)
    assert loss.item() == pytest.approx((err0 + err2) / 2, rel=1e-6)


def test_visible_tokens_do_not_count():
    pred, target = torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    loss = masked_reconstruction_loss(pred, target, mask, norm_pix=True)
    changed = torch.where(mask[..., None], pred, torch.randn(2, 6, 4))
    assert torch.equal(masked_reconstruction_loss(changed, target, mask, norm_pix=True), loss)
    loss.backward()
    assert torch.count_nonzero(pred.grad[~mask]) == 0 and torch.count_nonzero(pred.grad[mask]) > 0


def test_float_mask_and_module_agree_with_the_function():
    pred, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.rand(2, 5) > 0.5
    mask[0, 0] = True
    expected = masked_reconstruction_loss(pred, target, mask, norm_pix=True, eps=1e-4)
    assert torch.equal(masked_reconstruction_loss(pred, target, mask.float(), norm_pix=True, eps=1e-4), expected)
    module = MaskedReconstructionLoss(norm_pix=True, eps=1e-4)
    assert torch.equal(module(pred, target, mask), expected)
    assert "norm_pix=True" in repr(module)


def test_errors_print_shapes():
    with pytest.raises(ValueError, match=r"pred \(1, 3, 2\), target \(1, 3, 3\) and mask \(1, 3\)"):
        masked_reconstruction_loss(PRED, torch.zeros(1, 3, 3), MASK)
    with pytest.raises(ValueError, match=r"mask \(1, 2\)"):
        masked_reconstruction_loss(PRED, TARGET, MASK[:, :2])
    with pytest.raises(ValueError, match=r"mask \(1, 3\) masks no token"):
        masked_reconstruction_loss(PRED, TARGET, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 values per token"):
        masked_reconstruction_loss(PRED[..., :1], TARGET[..., :1], MASK, norm_pix=True)
