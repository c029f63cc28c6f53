"""The polar factor nearest the identity of a matrix of known low rank, without a (d, d) SVD.

A cross-covariance of ``n`` samples has rank at most ``n − 1``. When that is far below
its width ``d`` (wide layers, little calibration data: VGG's 4096-wide classifier on
256 images), :func:`~autoalign.aligners.linalg.polar_nearest_identity` spends two
``(d, d)`` SVDs on directions that are almost all null. Everything it computes lives in
a subspace of dimension at most ``2r``:

* the range: a Gaussian sketch ``(m mᵀ) m Ω`` (``Ω`` of ``r + p`` columns, one power
  iteration against the rounding spread over the other directions) spans the column
  space of a rank-``r`` matrix (Halko, Martinsson & Tropp, SIAM Review 2011), so the
  singular triplets above the threshold come from an SVD of ``(r + p, d)``;
* the null-space completion: with ``U``, ``V`` the kept singular vectors and ``W`` an
  orthonormal basis of ``span(U, V)``, the map ``M = (I − U Uᵀ)(I − V Vᵀ)`` is the
  identity on ``W``'s complement and maps ``span(W)`` into itself, so the rotation from
  the right null space onto the left one nearest the identity — the polar factor of
  ``M`` — is ``(I − W Wᵀ) + W R Wᵀ`` with ``R`` the polar factor of ``Wᵀ M W`` on its
  non-zero singular values.

The result equals the full computation up to rounding; the spectral norm of what the
sketch leaves out is estimated (power iterations) and, when it is not below the
threshold, or the completion is degenerate, None is returned and the caller takes
the full SVD.
"""

from __future__ import annotations

import torch

__all__ = ["low_rank_polar_nearest_identity", "OVERSAMPLE"]

#: Columns of the sketch beyond the rank bound.
OVERSAMPLE = 16


def low_rank_polar_nearest_identity(
    m: torch.Tensor, rank_bound: int, rtol: float, atol: float
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """:func:`~autoalign.aligners.linalg.polar_nearest_identity` (with the identity as the
    target on the null spaces) for ``m`` of rank at most ``rank_bound``.

    Parameters
    ----------
    m : Tensor, shape (d, d)
        The matrix (float64).
    rank_bound : int
        An upper bound on the rank of ``m`` apart from rounding (``n − 1`` for a
        cross-covariance of ``n`` samples).
    rtol, atol : float
        Singular values up to ``max(rtol · s_max, atol)`` count as zero.

    Returns
    -------
    (Q, s, rank) or None
        ``Q`` (d, d) orthogonal, ``s`` (d,) the singular values (those beyond the sketch
        as zeros), ``rank``; None when the sketch does not capture ``m`` to the
        threshold or the completion is degenerate (the caller then takes the full SVD).
    """
    d = m.shape[0]
    k = min(d, max(1, rank_bound) + OVERSAMPLE)
    g = torch.Generator(device=m.device).manual_seed(0)  # deterministic: the same plan every run
    omega = torch.randn(d, k, generator=g, dtype=m.dtype, device=m.device)
    basis, _ = torch.linalg.qr(m @ omega)  # (d, k)
    # one power iteration: rounding spreads a little energy over all d − r other directions,
    # which a plain sketch picks up; through m mᵀ it is damped by (σ_tail / σ_r)²
    basis, _ = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis)[0])
    ub, s, vt = torch.linalg.svd(basis.T @ m, full_matrices=False)  # (k, k), (k,), (k, d)
    smax = float(s[0]) if s.numel() else 0.0
    threshold = max(rtol * smax, atol)
    if _left_out_norm(m, basis, g) > threshold:
        return None
    rank = int((s > threshold).sum()) if smax > 0 else 0
    u, v = basis @ ub[:, :rank], vt[:rank].T  # (d, rank) each
    eye = torch.eye(d, dtype=m.dtype, device=m.device)
    q = u @ v.T
    if rank == 0:
        return eye, torch.zeros(d, dtype=m.dtype, device=m.device), 0
    # an orthonormal basis of span(U, V) from the Gram matrix [[I, UᵀV], [VᵀU, I]]
    uv = torch.cat([u, v], dim=1)
    evals, evecs = torch.linalg.eigh(uv.T @ uv)
    keep = evals > 1e-10 * float(evals[-1])
    w = uv @ (evecs[:, keep] / evals[keep].sqrt())  # (d, k')
    utw, vtw = u.T @ w, v.T @ w
    mw = w - u @ utw - v @ vtw + u @ ((u.T @ v) @ vtw)  # (I − UUᵀ)(I − VVᵀ) W
    a, sb, ct = torch.linalg.svd(w.T @ mw)
    j = int((sb > 1e-8).sum())
    if j != w.shape[1] - rank:  # the null spaces meet at a right angle somewhere: not unique, take the full path
        return None
    r = a[:, :j] @ ct[:j]
    q = q + eye - w @ w.T + w @ (r @ w.T)
    full = torch.zeros(d, dtype=m.dtype, device=m.device)
    full[: s.numel()] = s
    return q, full, rank


def _left_out_norm(m: torch.Tensor, basis: torch.Tensor, g: torch.Generator, iterations: int = 6) -> float:
    """An estimate of ``‖(I − B Bᵀ) m‖₂`` by power iteration (B: orthonormal columns)."""
    x = torch.randn(m.shape[1], 1, generator=g, dtype=m.dtype, device=m.device)
    norm = 0.0
    for _ in range(iterations):
        y = m @ x
        y = y - basis @ (basis.T @ y)  # (I − B Bᵀ) m x
        z = m.T @ y  # mᵀ (I − B Bᵀ)² m x, the projector being idempotent
        zn = float(torch.linalg.vector_norm(z))
        norm = float(torch.linalg.vector_norm(y)) / max(float(torch.linalg.vector_norm(x)), 1e-300)
        if zn == 0.0:
            return 0.0
        x = z / zn
    return norm
