"""The scattering transform's fast paths compute what the plain definitions do."""

from __future__ import annotations

import torch

from hemafed.core.learning.features import Scattering2D, _subsample


def test_subsample_is_the_mean_over_the_fourier_folds() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.complex(torch.randn(3, 5, 36, 36, generator=gen), torch.randn(3, 5, 36, 36, generator=gen))
    for k in (1, 2, 4):
        plain = x.reshape(3, 5, k, 36 // k, k, 36 // k).mean(dim=(-4, -2))
        assert torch.allclose(_subsample(x, k), plain, atol=1e-6)


def test_chunked_transform_equals_one_pass() -> None:
    x = torch.rand(37, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    scat = Scattering2D(28, 2, 8)
    chunked = scat(x)
    scat.chunk = 1000
    whole = scat(x)
    assert chunked.shape == (37, 243, 7, 7)
    assert torch.allclose(chunked, whole, atol=1e-6)
