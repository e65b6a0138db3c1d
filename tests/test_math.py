"""The math against a naive float64 block loop, over many shapes, b, r and dtypes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bora_tools.core.factors import (
    bora_forward_update,
    check_blocks,
    delta_weight,
    exact_lora_factors,
    factored_svd,
    mixed_row_blocks,
)


def naive_delta(A, B, sigma, s):
    """docs/format.md, section 1, literally: block (i, j) = s * B_i diag(sigma[i, j]) A_j, in float64."""
    A, B, sigma = A.double(), B.double(), sigma.double()
    b = sigma.shape[0]
    (m, _), n = B.shape, A.shape[1]
    mb, nb = m // b, n // b
    dw = torch.zeros(m, n, dtype=torch.float64)
    for i in range(b):
        for j in range(b):
            dw[i * mb : (i + 1) * mb, j * nb : (j + 1) * nb] = (
                s * B[i * mb : (i + 1) * mb] @ torch.diag(sigma[i, j]) @ A[:, j * nb : (j + 1) * nb]
            )
    return dw


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def bora_factors(draw, max_b=4):
    b = draw(st.integers(1, max_b))
    m, n = b * draw(st.integers(1, 6)), b * draw(st.integers(1, 6))
    r = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g).to(dtype)
    B = torch.randn(m, r, generator=g).to(dtype)
    sigma = torch.randn(b, b, r, generator=g).to(dtype)
    s = draw(st.sampled_from([1.0, 0.5, 2.0, 0.125]))
    return A, B, sigma, s


@settings(max_examples=80, deadline=None)
@given(bora_factors())
def test_delta_weight_matches_naive_block_loop(f):
    A, B, sigma, s = f
    ref = naive_delta(A, B, sigma, s)
    got = delta_weight(A, B, sigma, s, dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got32 = delta_weight(A, B, sigma, s)  # float32 by default, whatever the stored dtype
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(bora_factors())
def test_exact_lora_factors_reproduce_delta(f):
    A, B, sigma, s = f
    b_full, a_full = exact_lora_factors(A.double(), B.double(), sigma.double())
    b, _, r = sigma.shape
    assert b_full.shape == (B.shape[0], b * r) and a_full.shape == (b * r, A.shape[1])
    torch.testing.assert_close(s * b_full @ a_full, naive_delta(A, B, sigma, s), rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(bora_factors())
@pytest.mark.slow
def test_factored_svd_matches_dense_svd(f):
    A, B, sigma, s = f
    ref = naive_delta(A, B, sigma, s)
    svd = factored_svd(A, B, sigma, s)
    b, _, r = sigma.shape
    m, n = ref.shape
    assert svd.S.shape == (min(b * r, m, n),)
    dense_s = torch.linalg.svdvals(ref)
    torch.testing.assert_close(svd.S, dense_s[: svd.S.numel()], rtol=1e-9, atol=1e-9)
    assert float(dense_s[svd.S.numel() :].abs().sum()) < 1e-9  # nothing beyond b*r
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.Vh, ref, rtol=1e-9, atol=1e-9)
    for k in range(svd.S.numel() + 1):  # Eckart-Young: the discarded energy is the exact error
        b_k, a_k = svd.lora_factors(k, dtype=torch.float64)
        err = float(torch.linalg.norm(ref - b_k @ a_k))
        assert err == pytest.approx(svd.discarded_error(k), rel=1e-6, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(bora_factors())
def test_forward_update_equals_x_dw_t(f):
    A, B, sigma, s = f
    x = torch.randn(3, 2, A.shape[1], dtype=torch.float64)
    got = bora_forward_update(x, A.double(), B.double(), sigma.double(), s)
    torch.testing.assert_close(got, x @ naive_delta(A, B, sigma, s).T, rtol=1e-10, atol=1e-10)


def test_b1_sigma1_is_lora():
    A, B = torch.randn(3, 8), torch.randn(6, 3)
    sigma = torch.ones(1, 1, 3)
    torch.testing.assert_close(delta_weight(A, B, sigma, 2.0), 2.0 * B @ A)


def test_rank_deficient_fresh_adapter_has_zero_spectrum():
    A, B, sigma = torch.randn(4, 16), torch.zeros(16, 4), torch.ones(2, 2, 4)
    svd = factored_svd(A, B, sigma, 1.0)
    assert svd.rank() == 0 and float(svd.S.abs().max()) == 0.0
    b_k, a_k = svd.lora_factors(3)
    assert torch.count_nonzero(b_k @ a_k) == 0


def test_rank_deficient_repeated_rows():
    A = torch.randn(1, 16).repeat(4, 1)  # rank-1 A: every update has rank <= b
    B, sigma = torch.randn(16, 4), torch.rand(2, 2, 4) + 0.5
    svd = factored_svd(A, B, sigma, 1.0)
    ref = naive_delta(A, B, sigma, 1.0)
    assert svd.rank() == int(torch.linalg.matrix_rank(ref.float())) == 2
    torch.testing.assert_close(svd.S[:2], torch.linalg.svdvals(ref)[:2], rtol=1e-9, atol=1e-9)


def test_rank_exceeds_lora_rank():
    """The point of BoRA: rank b*r from r-rank factors."""
    A, B, sigma = torch.randn(4, 32), torch.randn(32, 4), torch.randn(4, 4, 4)
    assert factored_svd(A, B, sigma, 1.0).rank() == 16


def test_b_times_r_above_min_dim():
    A, B, sigma = torch.randn(5, 6), torch.randn(4, 5), torch.randn(2, 2, 5)  # b*r = 10 > min(m, n) = 4
    svd = factored_svd(A, B, sigma, 1.0)
    assert svd.S.numel() == 4 and svd.rank() == 4


def test_mixed_row_blocks_layout():
    A = torch.arange(12.0).reshape(2, 6)  # r=2, n=6, b=3
    sigma = torch.arange(1.0, 19.0).reshape(3, 3, 2)
    rows = mixed_row_blocks(A, sigma)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(
                rows[i][:, 2 * j : 2 * j + 2], sigma[i, j].unsqueeze(1) * A[:, 2 * j : 2 * j + 2]
            )


@pytest.mark.parametrize("m,n,b", [(10, 8, 4), (8, 10, 4), (8, 8, 0)])
def test_check_blocks_names_dimension(m, n, b):
    with pytest.raises(ValueError, match="q_proj"):
        check_blocks(m, n, b, name="q_proj")
