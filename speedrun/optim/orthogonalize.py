"""The orthogonalisers of Muon and NorMuon: maps G = U S V^T to roughly U V^T, in bf16 as the
records (or float32: optim.orthogonalize_dtype, where bf16 matmuls are slow).

`ORTHOGONALIZERS` names them for optim.orthogonalizer: "newton_schulz", the fixed quintic of the
2025 records (optim.ns_steps iterations), and "polar_express", the July-2026 record's five
iterations, each with its own quintic (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from speedrun.config import OptimConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# (a, b, c) of each iteration X <- aX + b(XX^T)X + c(XX^T)^2 X, computed for five iterations with
# safety factor 2e-2 and cushion 2 (record-2026.md §2.1).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize_dtype(cfg: OptimConfig, groups: list[dict]) -> torch.dtype:
    """optim.orthogonalize_dtype for the device of `groups`' parameters. "auto" is bf16, as the
    records, on CUDA and on CPUs with fast bf16 (speedrun.prepare.auto_dtype); on other CPUs torch
    emulates bf16 matmuls at a small fraction of float32's speed (Polar Express on tiny's matrices:
    625 ms a step against 21 ms in float32, docs/benchmarks.md), so there float32."""
    if cfg.orthogonalize_dtype != "auto":
        return getattr(torch, cfg.orthogonalize_dtype)
    from speedrun.prepare import auto_dtype

    return auto_dtype(next(p.device for group in groups for p in group["params"]))


def newton_schulz(G: Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately orthogonalise every matrix in G (shape (..., m, n)), in `dtype`.

    The quintic's coefficients push small singular values up fast rather than converging exactly,
    so the result is roughly U S' V^T with S' spread over about [0.5, 1.5], not U V^T; that is
    enough for Muon and needs only a handful of steps."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    # The Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1].
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def polar_express(G: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Orthogonalise every matrix in G (shape (..., m, n)) with the record's Polar Express, in
    `dtype` (the record: bf16).

    X = G / (‖G‖_F·1.02 + 1e-6) in `dtype`, then per (a, b, c) of POLAR_EXPRESS_COEFFICIENTS: wide,
    A = XXᵀ and X ← aX + (bA + cA²)X; tall, A = XᵀX and X ← aX + X(bA + cA²). Each iteration's
    quintic is the best one for the interval the singular values are in by then, so five of them
    bring singular values from [1e-3, 1] to about 1 (see tests/test_normuon.py for the band)."""
    m, n = G.shape[-2:]
    X = G.to(dtype).reshape(-1, m, n)  # one batch of matrices, so baddbmm serves every shape
    # The Frobenius norm bounds the spectral norm; the 2% margin keeps bf16 rounding from pushing
    # the largest singular value past 1, where the quintics were not fitted.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = m > n
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        A = X.mT @ X if tall else X @ X.mT  # the smaller Gram matrix
        # bA + cA² and aX + ... as single fused products, one bf16 rounding each, as the record's kernels
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X.view(G.shape)


# Every entry takes (G, ns_steps, dtype); Polar Express's iterations are fixed by its coefficients.
ORTHOGONALIZERS: dict[str, Callable[[Tensor, int, torch.dtype], Tensor]] = {
    "newton_schulz": newton_schulz,
    "polar_express": lambda G, ns_steps, dtype: polar_express(G, dtype),
}


@functools.cache
def _compiled(name: str) -> Callable[[Tensor, int, torch.dtype], Tensor]:
    # One static graph per matrix shape (a handful, all met in the warm-up): the record found the
    # dynamic-shape kernels that a second shape would otherwise switch to much slower.
    return torch.compile(ORTHOGONALIZERS[name], dynamic=False)


def orthogonalize(G: Tensor, name: str, ns_steps: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """ORTHOGONALIZERS[name](G, ns_steps, dtype), compiled on CUDA, where the iterations fuse into a
    few kernels; on CPU compiling costs more than it saves."""
    return (_compiled(name) if G.is_cuda else ORTHOGONALIZERS[name])(G, ns_steps, dtype)
