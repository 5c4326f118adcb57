"""Within-adapter whitening of prompt embeddings (shrinkage LDA metric), computed once at build time.

The router scores ``cos(W (pooled - center), C[k])``. With ``W = I`` the dominant directions of the backbone's
input-embedding space (shared by every prompt: frequent tokens, formatting) drown the directions that tell tasks
apart. ``W = S^(-1/2)`` with ``S`` the covariance of each prompt around *its own adapter's* mean (averaged over
adapters, weighted by prompt count) turns the cosine into a Mahalanobis-style comparison under the shared
within-adapter covariance, the metric of linear discriminant analysis. ``S`` is shrunk towards a multiple of the
identity with the Ledoit-Wolf intensity (computed from the data, no tuned constant), so it is well conditioned even
with fewer prompts than dimensions. Training-free: one covariance and one eigendecomposition ([D, D]).

Measured on routing-dev with the default backbone (benchmarks/routing_quality.py, docs/routing_quality.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

WHITENING_KINDS = ("within", "none")


def ledoit_wolf_shrinkage(centered: torch.Tensor) -> float:
    """Ledoit-Wolf optimal shrinkage intensity in [0, 1] for the covariance of centered rows [N, D].

    The estimator of Ledoit & Wolf (2004) as in scikit-learn's ``ledoit_wolf_shrinkage`` (float64 throughout).
    """
    x = centered.to(torch.float64)
    n, d = x.shape
    x2 = x * x
    emp_diag = x2.sum(0) / n  # [D]
    mu = emp_diag.sum() / d
    beta_ = (x2.T @ x2).sum()
    delta_ = ((x.T @ x) ** 2).sum() / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * emp_diag.sum() + d * mu**2) / d
    beta = torch.minimum(beta, delta)
    return 0.0 if float(delta) == 0.0 else float(beta / delta)


def within_adapter_whitening(points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Whitening matrix W [D, D] fp32 (symmetric, ZCA) from each adapter's pooled prompt embeddings.

    `points`: one [N_a, D] tensor per adapter (any centering: each adapter is centered on its own mean). Returns
    (W, info) where ``W = S^(-1/2)``, ``S = (1 - s) C + s (tr C / D) I``, ``C`` the pooled within-adapter
    covariance (sum over adapters of the scatter around the adapter mean, divided by the total prompt count) and
    ``s`` the Ledoit-Wolf intensity; info = {"shrinkage": s, "num_prompts": N, "condition_number": ...}.
    Guarantees: deterministic; W is finite and positive definite (eigenvalues of S clamped at 1e-12 tr C / D);
    an adapter with one prompt contributes nothing to C. Raises ValueError when no adapter has two prompts and
    the covariance is therefore zero.
    """
    if not points:
        raise ValueError("within_adapter_whitening needs at least one adapter's embeddings.")
    centered = torch.cat([p.to(torch.float64) - p.to(torch.float64).mean(dim=0) for p in points])  # [N, D]
    dim = centered.shape[1]
    cov = centered.T @ centered / centered.shape[0]  # [D, D]
    scale = float(torch.trace(cov)) / dim
    if not scale > 0.0:
        raise ValueError(
            "Cannot whiten: the prompts show no spread within any adapter (every adapter has one prompt, or identical "
            "prompts). Give each adapter several distinct prompts, or build with whitening='none'."
        )
    shrinkage = ledoit_wolf_shrinkage(centered)
    cov = (1.0 - shrinkage) * cov + shrinkage * scale * torch.eye(dim, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues = eigenvalues.clamp_min(1e-12 * scale)
    transform = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T  # [D, D] = S^(-1/2)
    info = {
        "shrinkage": round(shrinkage, 6),
        "num_prompts": int(centered.shape[0]),
        "condition_number": round(float(eigenvalues[-1] / eigenvalues[0]), 3),
    }
    return transform.to(torch.float32).contiguous(), info
