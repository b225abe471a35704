"""The classifier's batched train/eval presets on the device."""

from __future__ import annotations

import numpy as np
import torch

from medhier.config import PreprocessConfig
from medhier.classify.presets import eval_preset, train_preset

NO_AUGMENT = dict(rotation_deg=0, shift=0, shear_deg=0, zoom=[1, 1], hflip=0, vflip=0, blur_prob=0)


def _batch(b=4, s=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, s, s), dtype=np.uint8))


def test_eval_preset_normalises_deterministically():
    cfg = PreprocessConfig()
    images = _batch()
    out = eval_preset(cfg)(images)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, eval_preset(cfg)(images))
    expected = (images[0, 3, 5] / 255.0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    torch.testing.assert_close(out[0, :, 3, 5], expected)


def test_train_preset_without_augmentation_is_the_eval_preset():
    cfg = PreprocessConfig(**NO_AUGMENT)
    images = _batch()
    torch.testing.assert_close(train_preset(cfg)(images), eval_preset(cfg)(images), atol=1e-5, rtol=0)


def test_hflip_mirrors():
    cfg = PreprocessConfig(**{**NO_AUGMENT, "hflip": 1.0})
    images = _batch()
    torch.testing.assert_close(train_preset(cfg)(images), eval_preset(cfg)(images).flip(-1), atol=1e-5, rtol=0)


def test_parameters_are_drawn_per_sample_and_reproducible():
    cfg = PreprocessConfig()
    same = _batch(b=1).expand(8, -1, -1).contiguous()
    a = train_preset(cfg)(same, generator=torch.Generator().manual_seed(1))
    b = train_preset(cfg)(same, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    # identical inputs, different outputs: each sample got its own transform
    assert len({tuple(x.flatten()[:50].tolist()) for x in a}) == 8


def test_shift_fills_with_black():
    cfg = PreprocessConfig(**{**NO_AUGMENT, "shift": 0.45})
    white = torch.full((16, 32, 32), 255, dtype=torch.uint8)
    out = train_preset(cfg)(white, generator=torch.Generator().manual_seed(0))
    black = (0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    # every shifted image has a black margin somewhere (image-wide shifts up to 45 %)
    corners = out[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.isclose(corners, black[0], atol=1e-4).any(dim=1).float().mean() > 0.8


def test_rotation_stays_within_the_configured_angle():
    # A horizontal bar rotated by at most 15 degrees stays mostly horizontal.
    cfg = PreprocessConfig(**{**NO_AUGMENT, "rotation_deg": 15})
    bar = torch.zeros(32, 64, 64, dtype=torch.uint8)
    bar[:, 30:34, 8:56] = 255
    out = train_preset(cfg)(bar, generator=torch.Generator().manual_seed(0))[:, 0]
    unit = out * torch.tensor(cfg.std[0]) + torch.tensor(cfg.mean[0])
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for img in unit:
        w = img.clamp(min=0)
        cx, cy = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
        cov = torch.stack([((w * (xs - cx) * (ys - cy)).sum()), (w * (xs - cx) ** 2).sum()])
        angle = torch.rad2deg(0.5 * torch.atan2(2 * cov[0], cov[1] - (w * (ys - cy) ** 2).sum()))
        assert abs(float(angle)) <= 15.5


def test_blur_smooths_noise():
    noise = _batch(b=8, s=48)
    sharp = eval_preset(PreprocessConfig())(noise)
    blurred = train_preset(PreprocessConfig(**{**NO_AUGMENT, "blur_prob": 1.0, "blur_sigma": [1.0, 1.5]}))(noise)
    assert blurred.std() < 0.6 * sharp.std()
