"""The quality benchmark's pre-training pieces against plain computations."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from bench.quality.training import _nt_xent, _ssl_view


def test_nt_xent_matches_a_loop_over_the_pairs():
    torch.manual_seed(0)
    first, second = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    everything = torch.cat([first, second])
    losses = []
    for i in range(10):
        positive = (i + 5) % 10
        logits = [float(everything[i] @ everything[j]) / 0.1 for j in range(10) if j != i]
        numerator = float(everything[i] @ everything[positive]) / 0.1
        losses.append(-numerator + math.log(sum(math.exp(value) for value in logits)))
    assert abs(float(_nt_xent(first, second, temperature=0.1)) - np.mean(losses)) < 1e-4


def test_ssl_view_crops_without_flipping_or_recolouring():
    generator = np.random.default_rng(0)
    image = torch.zeros(1, 3, 32, 32)
    image[:, 0, :, :16] = 1.0  # red on the left half only
    views = _ssl_view(image.repeat(64, 1, 1, 1), generator)
    assert views.shape == (64, 3, 32, 32)
    left, right = views[:, 0, :, :4].mean(dim=(1, 2)), views[:, 0, :, -4:].mean(dim=(1, 2))
    assert (left - right > 0.5).all()  # never mirrored: every view keeps the red edge on the left
    assert views[:, 1:].abs().mean() < 0.1  # no colour change beyond the pixel noise
