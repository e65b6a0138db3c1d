"""The BoRA math as pure tensor functions (no I/O, any device).

Notation (docs/format.md, section 1): ``W`` is ``(m, n)`` (out, in); ``A`` is ``(r, n)``,
``B`` is ``(m, r)``, ``sigma`` is ``(b, b, r)`` and ``s`` the scaling. Block
``(i, j)`` of the update is ``s * B_i @ diag(sigma[i, j]) @ A_j``.

Everything is computed in float32 or float64 whatever the stored dtype, and
cast once by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def block_problems(m: int, n: int, b: int, *, name: str = "module") -> list[str]:
    """Why ``b`` blocks do not fit an ``(m, n)`` update (empty when they do), naming module, dimension and ``b``."""
    if b < 1:
        return [f"{name}: bora_blocks must be >= 1, found {b}"]
    return [f"{name}: {dim_name}={dim} is not divisible by bora_blocks b={b}"
            for dim_name, dim in (("out_features m", m), ("in_features n", n)) if dim % b]


def check_blocks(m: int, n: int, b: int, *, name: str = "module") -> None:
    """Raise ``ValueError`` naming the module and dimension when ``b`` does not divide it."""
    problems = block_problems(m, n, b, name=name)
    if problems:
        raise ValueError("; ".join(problems))


def mixed_row_blocks(A: Tensor, sigma: Tensor) -> Tensor:
    """The row blocks of the exact LoRA ``A'``, as a ``(b, r, n)`` tensor.

    Row block ``i`` is ``[diag(sigma[i, 0]) A_0, ..., diag(sigma[i, b-1]) A_{b-1}]``.
    """
    b, _, r = sigma.shape
    n = A.shape[1]
    a_cols = A.reshape(r, b, n // b).permute(1, 0, 2)  # (b_j, r, n/b): column block j of A
    mixed = sigma.unsqueeze(-1) * a_cols.unsqueeze(0)  # (b_i, b_j, r, n/b)
    return mixed.permute(0, 2, 1, 3).reshape(b, r, n)


def delta_weight(A: Tensor, B: Tensor, sigma: Tensor, scaling: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense update ``dW`` ``(m, n)``, built blockwise in ``dtype`` on A's device.

    Cost ``m*n*r`` multiply-adds (one batched matmul), the same as a LoRA of rank r.

    Example::

        dW = delta_weight(A, B, sigma, scaling=2.0)   # (m, n) float32
    """
    A, B, sigma = (t.to(dtype) for t in (A, B, sigma))
    b = sigma.shape[0]
    m, r = B.shape
    b_rows = B.reshape(b, m // b, r)  # B_i
    dw = torch.bmm(b_rows, mixed_row_blocks(A, sigma))  # (b, m/b, n): row block i = B_i @ A'_i
    return dw.reshape(m, -1).mul_(scaling)


def exact_lora_factors(A: Tensor, B: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """``(B', A')`` with ``B' @ A' * s == dW`` exactly: a LoRA of rank ``b*r``.

    ``B' = blockdiag(B_1..B_b)`` is ``(m, b*r)``; ``A'`` is ``(b*r, n)``. The
    scaling is not folded in. Returned in the dtype of the inputs.
    """
    b, _, r = sigma.shape
    m = B.shape[0]
    b_rows = B.reshape(b, m // b, r)
    b_full = torch.block_diag(*b_rows.unbind(0))
    a_full = mixed_row_blocks(A, sigma).reshape(b * r, -1)
    return b_full, a_full


@dataclass
class FactoredSVD:
    """The SVD of a BoRA update, ``dW = U @ diag(S) @ Vh``, found without forming ``dW``.

    ``S`` holds all ``min(b*r, m, n)`` singular values in descending order
    (float64); ``U`` ``(m, k)`` and ``Vh`` ``(k, n)`` are float64 as well.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def energy(self) -> Tensor:
        """Squared Frobenius norm of dW (sum of S^2)."""
        return (self.S**2).sum()

    def discarded_error(self, k: int) -> float:
        """``||dW - dW_k||_F`` of the best rank-``k`` approximation (Eckart-Young)."""
        return float((self.S[k:] ** 2).sum().sqrt())

    def rank(self, rtol: float | None = None) -> int:
        """Numerical rank: singular values above ``rtol * S[0]``.

        The default ``rtol`` is ``max(m, n) * eps(float32)``, the threshold
        ``torch.linalg.matrix_rank`` would use on the float32 ``dW``.
        """
        if self.S.numel() == 0 or float(self.S[0]) == 0.0:
            return 0
        if rtol is None:
            rtol = max(self.U.shape[0], self.Vh.shape[1]) * torch.finfo(torch.float32).eps
        return int((self.S > rtol * self.S[0]).sum())

    def lora_factors(self, k: int, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(B_k, A_k)`` of the best rank-``k`` approximation, ``B_k @ A_k ~= dW``.

        The singular values are split evenly (``sqrt(S)`` on each side) so that
        both factors have the same scale, which keeps float16/bfloat16 storage
        far from overflow and underflow.
        """
        root = self.S[:k].sqrt()
        b_k = self.U[:, :k] * root  # scale columns
        a_k = root.unsqueeze(1) * self.Vh[:k]  # scale rows
        return b_k.to(dtype).contiguous(), a_k.to(dtype).contiguous()


def factored_svd(A: Tensor, B: Tensor, sigma: Tensor, scaling: float) -> FactoredSVD:
    """SVD of ``dW`` from the factors alone: no ``m x n`` matrix is built.

    Thin QR of ``B'`` block by block (it is block-diagonal) and of ``A'^T``,
    then the SVD of the small ``(<=b*r, <=b*r)`` core ``s * R_B @ R_A^T``.
    Works in float64: the factors are read once and the core is tiny.
    Correct for rank-deficient factors (a fresh adapter with ``B = 0`` gives
    ``S = 0``).

    Example::

        svd = factored_svd(A, B, sigma, scaling)
        B4, A4 = svd.lora_factors(4)             # best rank-4 LoRA
        err = svd.discarded_error(4)             # ||dW - B4 @ A4||_F
    """
    if _wider_than_dw(A, B, sigma):
        return dense_svd(A, B, sigma, scaling)
    A, B, sigma = (t.to(torch.float64) for t in (A, B, sigma))
    b, _, r = sigma.shape
    m = B.shape[0]
    # B' = blockdiag(Q_i) @ blockdiag(R_i): one batched QR of the b row blocks.
    q_b, r_b = torch.linalg.qr(B.reshape(b, m // b, r))  # (b, m/b, kb), (b, kb, r)
    # A'^T = Q_A @ R_A with A' = the (b*r, n) mixed factor.
    a_full = mixed_row_blocks(A, sigma).reshape(b * r, -1)
    q_a, r_a = torch.linalg.qr(a_full.T)  # (n, ka), (ka, b*r)
    core = torch.block_diag(*r_b.unbind(0)) @ r_a.T * scaling  # (b*kb, ka)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    kb = q_b.shape[2]
    # U = blockdiag(Q_i) @ U_c, done block by block: row block i uses rows i*kb.. of U_c.
    u = torch.bmm(q_b, u_c.reshape(b, kb, -1)).reshape(m, -1)
    vh = vh_c @ q_a.T
    return FactoredSVD(U=u, S=s, Vh=vh)


def gram_svd(A: Tensor, B: Tensor, sigma: Tensor, scaling: float, *, vectors: int | None = None) -> FactoredSVD:
    """The SVD of ``dW`` like ``factored_svd``, from the small Gram matrices of the factors.

    ``B'^T B'`` is block-diagonal (blocks ``B_i^T B_i``, ``r x r``) and block
    ``(i, i')`` of ``A' A'^T`` is ``sum_j diag(sigma[i,j]) A_j A_j^T diag(sigma[i',j])``,
    so the factors are read once by matrix products (no QR, no ``A'``) and
    everything else works on ``(b*r, b*r)`` matrices. Gram matrices square the
    condition number: they are formed and factored in float64, and eigenvalues
    below ``dim * eps(float64)`` of the largest (per block for ``B'``) count as
    zero, so singular values are accurate to about ``1e-7 * S[0]`` (ample for
    float32 storage) and rank-deficient factors (a fresh adapter, ``B = 0``) give
    exact zeros. Columns of ``U`` / rows of ``Vh`` for zero singular values are zero.

    ``vectors`` limits ``U`` and ``Vh`` to the leading ``vectors`` singular
    vectors (``S`` is always complete): assembling them is most of the cost,
    and a rank-``k`` truncation needs only ``k``.

    Example::

        svd = gram_svd(A, B, sigma, scaling)     # same S as factored_svd, faster on a busy CPU
        B8, A8 = svd.lora_factors(8)
        gram_svd(A, B, sigma, scaling, vectors=8).lora_factors(8)   # the same, cheaper
    """
    if _wider_than_dw(A, B, sigma):
        return dense_svd(A, B, sigma, scaling, vectors=vectors)
    A, B, sigma = (t.to(torch.float64) for t in (A, B, sigma))
    b, _, r = sigma.shape
    m, n = B.shape[0], A.shape[1]
    b_rows = B.reshape(b, m // b, r)  # B_i
    a_cols = A.reshape(r, b, n // b).transpose(0, 1)  # (b_j, r, n/b): A_j
    lam_b, v_b = torch.linalg.eigh(b_rows.transpose(1, 2) @ b_rows)  # per block: B_i^T B_i = V diag(lam) V^T
    c = a_cols @ a_cols.transpose(1, 2)  # A_j A_j^T
    lam_a, v_a = torch.linalg.eigh(torch.einsum("ijp,jpq,kjq->ipkq", sigma, c, sigma).reshape(b * r, b * r))
    root_b, inv_b = _gram_roots(lam_b, r)
    root_a, inv_a = _gram_roots(lam_a.unsqueeze(0), b * r)
    # B' = Q_B R_B and A'^T = Q_A R_A with R = diag(sqrt(lam)) V^T; the core is s * R_B R_A^T.
    r_b = torch.block_diag(*(root_b.unsqueeze(-1) * v_b.transpose(1, 2)).unbind(0))
    core = r_b @ (v_a * root_a) * scaling
    u_c, s, vh_c = torch.linalg.svd(core)
    s = s[: min(b * r, m, n)]
    k = s.numel() if vectors is None else min(vectors, s.numel())
    u_c, vh_c = u_c[:, :k], vh_c[:k]
    # U = B' V_B diag(1/sqrt(lam_B)) U_c, block by block (B' is block-diagonal).
    u = torch.bmm(b_rows, (v_b * inv_b.unsqueeze(1)) @ u_c.reshape(b, r, k)).reshape(m, k)
    # Vh = Vh_c diag(1/sqrt(lam_A)) V_A^T A'; column block j of A' is sum_i diag(sigma[i,j]) A_j, folded into weights.
    w = torch.einsum("kip,ijp->jkp", ((vh_c * inv_a) @ v_a.T).reshape(k, b, r), sigma)  # (b_j, k, r)
    vh = torch.bmm(w, a_cols).transpose(0, 1).reshape(k, n)
    return FactoredSVD(U=u, S=s, Vh=vh)


def _wider_than_dw(A: Tensor, B: Tensor, sigma: Tensor) -> bool:
    """``b*r > min(m, n)``: the factored routes would work on ``(b*r)^2`` matrices larger than ``dW`` itself."""
    b, _, r = sigma.shape
    return b * r > min(B.shape[0], A.shape[1])


def dense_svd(A: Tensor, B: Tensor, sigma: Tensor, scaling: float, *, vectors: int | None = None) -> FactoredSVD:
    """The SVD of ``dW`` formed densely in float64: the route when ``b*r > min(m, n)``.

    Ranks above ``min(m, n)`` carry nothing more: ``dW`` (``m*n`` values, at most ``b`` times the factors'
    size since ``min(m, n) < b*r``) is smaller than the ``(b*r)^2`` Gram or core matrices, so the work is
    bounded by ``m*n*min(m, n)`` whatever ``r`` is. ``vectors`` limits ``U``/``Vh`` as in ``gram_svd``.
    """
    dw = delta_weight(A, B, sigma, scaling, dtype=torch.float64)
    m, n = dw.shape
    if vectors == 0:
        s = torch.linalg.svdvals(dw)
        return FactoredSVD(U=dw.new_zeros(m, 0), S=s, Vh=dw.new_zeros(0, n))
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    k = s.numel() if vectors is None else min(vectors, s.numel())
    return FactoredSVD(U=u[:, :k], S=s, Vh=vh[:k])


def _gram_roots(lam: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``sqrt(lam)`` and its inverse per row, with eigenvalues at rounding level set to exactly zero."""
    tol = dim * torch.finfo(torch.float64).eps * lam.amax(dim=-1, keepdim=True).clamp_min(0)
    keep = lam > tol
    root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv = torch.where(keep, 1 / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(lam))
    return root, inv


def bora_forward_update(x: Tensor, A: Tensor, B: Tensor, sigma: Tensor, scaling: float) -> Tensor:
    """``s * x @ dW^T`` without forming ``dW`` (what a trainer must use).

    Split ``x`` into ``b`` chunks; ``U_j = A_j x_j``; ``V_i = sum_j sigma[i,j] U_j``;
    ``y_i = B_i V_i``. Cost: a LoRA of rank r plus ``b*b*r`` multiply-adds per token.
    """
    b, _, r = sigma.shape
    m, n = B.shape[0], A.shape[1]
    xb = x.reshape(*x.shape[:-1], b, n // b)
    a_cols = A.reshape(r, b, n // b).transpose(0, 1)  # (b, r, n/b)
    u = torch.einsum("...jk,jrk->...jr", xb, a_cols)
    v = torch.einsum("...jr,ijr->...ir", u, sigma)
    y = torch.einsum("...ir,imr->...im", v, B.reshape(b, m // b, r))
    return y.reshape(*x.shape[:-1], m) * scaling
