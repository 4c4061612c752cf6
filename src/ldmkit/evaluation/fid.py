"""Fréchet distance between feature distributions (FID, Heusel et al. 2017, "GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium").

Each set of features is summarised by a Gaussian (mean mu, covariance sigma); the distance is

    d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

The trace of the matrix square root is computed from symmetric matrices only:
(sigma1 sigma2)^(1/2) has the same eigenvalues as s1 sigma2 s1 with s1 = sigma1^(1/2), which is
symmetric positive semi-definite, so two `eigh` calls do it without scipy's general `sqrtm`.
Arithmetic is float64 throughout. Here the features are those of ldmkit's own small classifiers,
not Inception, so the numbers compare models on one data set, not with published FIDs.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D)) of features (N, D), float64, unbiased covariance."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise InvalidArgument(f"need features (N >= 2, D), got shape {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(dim=0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    sym = (matrix + matrix.T) / 2  # remove round-off asymmetry before eigh
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (see module docstring)."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(),) * 2:
        raise InvalidArgument("frechet_distance: means (D,) and covariances (D, D) of one size D")
    s1 = sqrtm_psd(sigma1)
    middle = s1 @ sigma2 @ s1  # symmetric PSD, same eigenvalues as sigma1 @ sigma2
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    trace_sqrt = eigenvalues.sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt
    return float(d2.clamp_min(0))


def fid_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
