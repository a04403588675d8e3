"""Cross-entropy and HRNet's OHEM cross-entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusion_seg.errors import UserError
from fusion_seg.training.losses import CrossEntropy, OhemCrossEntropy, build_loss


def hrnet_ohem_reference(score, target, ignore, thresh, min_kept, weight=None):
    """HRNet's ``OhemCrossEntropy.forward`` (lib/core/criterion.py), transcribed."""
    min_kept = max(1, min_kept)
    pred = F.softmax(score, dim=1)
    pixel_losses = F.cross_entropy(score, target, weight=weight, ignore_index=ignore,
                                   reduction="none").contiguous().view(-1)
    mask = target.contiguous().view(-1) != ignore
    tmp_target = target.clone()
    tmp_target[tmp_target == ignore] = 0
    pred = pred.gather(1, tmp_target.unsqueeze(1))
    pred, ind = pred.contiguous().view(-1,)[mask].contiguous().sort()
    min_value = pred[min(min_kept, pred.numel() - 1)]
    threshold = max(min_value, thresh)
    pixel_losses = pixel_losses[mask][ind]
    pixel_losses = pixel_losses[pred < threshold]
    return pixel_losses.mean()


def random_batch(seed=0, n=2, c=5, h=9, w=11, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 3
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def test_ohem_equals_ce_when_everything_is_kept():
    logits, target = random_batch()
    ohem = OhemCrossEntropy(ignore_index=255, thresh=1.01, min_kept=10**9)
    torch.testing.assert_close(ohem(logits, target),
                               F.cross_entropy(logits, target, ignore_index=255))


def test_ohem_keeps_only_the_hard_pixel():
    # Pixel 0: confidently correct (class 0). Pixel 1: wrong (GT 1, predicts 0).
    logits = torch.tensor([[10.0, 0.0], [-10.0, 0.0]]).reshape(1, 2, 1, 2)
    logits = logits.requires_grad_()
    target = torch.tensor([[[0, 1]]])
    loss = OhemCrossEntropy(thresh=0.7, min_kept=1)(logits, target)
    hard = F.cross_entropy(logits[..., 1:], target[..., 1:])
    torch.testing.assert_close(loss, hard)
    loss.backward()
    assert torch.all(logits.grad[..., 0] == 0)
    assert torch.all(logits.grad[..., 1] != 0)


def test_ohem_all_ignored_is_zero_and_backpropagates():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = OhemCrossEntropy()(logits, target)
    assert loss.item() == 0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_ohem_nothing_below_threshold_is_zero_not_nan():
    # One valid, confident pixel: HRNet's formula gives the mean of nothing (NaN).
    logits = torch.tensor([[[[20.0]], [[0.0]]]], requires_grad=True)
    loss = OhemCrossEntropy(thresh=0.7, min_kept=5)(logits, torch.tensor([[[0]]]))
    assert loss.item() == 0
    loss.backward()


@pytest.mark.parametrize("seed,thresh,min_kept,weighted", [
    (0, 0.7, 50, False),
    (1, 0.9, 131072, False),   # min_kept beyond the pixel count
    (2, 0.3, 10, True),
    (3, 0.05, 1, False),
])
def test_ohem_matches_hrnet_reference(seed, thresh, min_kept, weighted):
    logits, target = random_batch(seed)
    weight = torch.linspace(0.84, 1.15, 5) if weighted else None
    expected = hrnet_ohem_reference(logits, target, 255, thresh, min_kept, weight)
    got = OhemCrossEntropy(255, thresh, min_kept, weight=weight)(logits, target)
    torch.testing.assert_close(got, expected)


def test_ohem_accepts_bfloat16_logits():
    logits, target = random_batch()
    got = OhemCrossEntropy(thresh=0.7, min_kept=50)(logits.bfloat16(), target)
    expected = hrnet_ohem_reference(logits.bfloat16().float(), target, 255, 0.7, 50)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_build_loss():
    logits, target = random_batch()
    weight = [1.0, 2.0, 0.5, 1.0, 1.0]
    ce = build_loss("ce", ignore_index=255, weight=weight, thresh=0.9, min_kept=5)
    assert isinstance(ce, CrossEntropy)
    torch.testing.assert_close(
        ce(logits, target),
        F.cross_entropy(logits, target, weight=torch.tensor(weight), ignore_index=255))
    ohem = build_loss("ohem", ignore_index=255, thresh=0.8, min_kept=7)
    assert isinstance(ohem, OhemCrossEntropy)
    assert (ohem.thresh, ohem.min_kept, ohem.ignore_index) == (0.8, 7, 255)
    with pytest.raises(UserError, match="ce, ohem"):
        build_loss("focal", ignore_index=255)
    with pytest.raises(UserError, match="ohem"):
        build_loss("ohem", ignore_index=255, threshold=0.8)
