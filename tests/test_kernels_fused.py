"""The fused Triton kernels (RMSNorm + residual, SiLU·mul, rotary embedding + KV-cache write)
against their torch references, on random inputs of several shapes.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), which is how CI tests them; with one, on the GPU in float16.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.kernels.activation import silu_mul  # noqa: E402
from kiln.kernels.norm import rms_norm  # noqa: E402
from kiln.kernels.rope_cache import rope_and_cache  # noqa: E402
from kiln.model.attention import write_kv  # noqa: E402
from kiln.model.layers import apply_rope, rms_norm_ref, silu_mul_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=2e-3, rtol=2e-3) if DTYPE == torch.float16 else dict(atol=1e-5, rtol=1e-5)


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DTYPE).to(DEVICE)


@pytest.mark.parametrize("rows,n", [(1, 64), (7, 576), (3, 4096), (33, 100)])
def test_rms_norm(rows, n):
    x, w = rand(rows, n, seed=1), rand(n, seed=2)
    y, s = rms_norm(x, w, 1e-5)
    assert s is None
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-5), **TOL)


@pytest.mark.parametrize("rows,n", [(1, 64), (5, 576), (2, 4096)])
def test_rms_norm_with_residual(rows, n):
    x, r, w = rand(rows, n, seed=1), rand(rows, n, seed=3, scale=4.0), rand(n, seed=2)
    y, s = rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(s, x + r, atol=0, rtol=0)  # the new residual stream, exactly
    torch.testing.assert_close(y, rms_norm_ref(x + r, w, 1e-6), **TOL)
    assert torch.equal(r, rand(rows, n, seed=3, scale=4.0))  # inputs untouched


def test_rms_norm_strided_rows():
    """A view whose rows are not adjacent (e.g. every other row) is read through its stride."""
    base, w = rand(8, 256, seed=4), rand(256, seed=5)
    x = base[::2]
    y, _ = rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-5), **TOL)


@pytest.mark.parametrize("t,i", [(1, 64), (3, 1536), (2, 11008), (9, 1000)])
def test_silu_mul(t, i):
    gu = rand(t, 2 * i, seed=6, scale=3.0)
    torch.testing.assert_close(silu_mul(gu), silu_mul_ref(gu), **TOL)


BS = 16
ROPE_CASES = [  # (tokens, heads, kv_heads, head_dim)
    (1, 4, 4, 64),  # GQA ratio 1
    (19, 8, 2, 64),  # ratio 4, across block boundaries
    (5, 16, 2, 128),  # ratio 8, head dim 128
    (3, 9, 3, 128),  # head counts that are not powers of two
]


def qkv_views(t, heads, kv_heads, d, seed):
    """q, k, v as views of one fused qkv row (as the model passes them) and a random cos|sin table."""
    q_size, kv_size = heads * d, kv_heads * d
    qkv = rand(t, q_size + 2 * kv_size, seed=seed)
    q = qkv[:, :q_size].view(t, heads, d)
    k = qkv[:, q_size:q_size + kv_size].view(t, kv_heads, d)
    v = qkv[:, q_size + kv_size:].view(t, kv_heads, d)
    angles = torch.rand(t, d // 2, generator=torch.Generator().manual_seed(seed + 1)) * 6.3
    return q, k, v, torch.cat([angles.cos(), angles.sin()], -1).to(DEVICE)


@pytest.mark.parametrize("t,heads,kv_heads,d", ROPE_CASES)
def test_rope_and_cache(t, heads, kv_heads, d):
    """Views of one fused qkv row, as the model passes them; slots scattered over shuffled blocks."""
    q, k, v, cos_sin = qkv_views(t, heads, kv_heads, d, seed=7)
    num_blocks = 8
    g = torch.Generator().manual_seed(9)
    slots = torch.randperm(num_blocks * BS, generator=g)[:t].to(DEVICE)
    kc, vc = (rand(num_blocks, BS, kv_heads, d, seed=s) for s in (10, 11))
    want_kc, want_vc = kc.clone(), vc.clone()
    write_kv(want_kc, want_vc, apply_rope(k, cos_sin), v, slots)
    want_q = apply_rope(q, cos_sin)

    got_q = rope_and_cache(q, k, v, cos_sin, kc, vc, slots)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(kc, want_kc, **TOL)
    assert torch.equal(vc, want_vc)  # values are copied, not rounded
    untouched = torch.ones(num_blocks * BS, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(kc.view(-1, kv_heads, d)[untouched.to(DEVICE)],
                       rand(num_blocks, BS, kv_heads, d, seed=10).view(-1, kv_heads, d)[untouched.to(DEVICE)])


@pytest.mark.parametrize("t,heads,kv_heads,d", [(5, 8, 2, 64), (3, 4, 4, 128)])
def test_rope_and_cache_with_rotated_keys(t, heads, kv_heads, d):
    """with_k: the rotated keys come back too (what a fresh prompt's attention runs on), equal to
    the keys written to the cache."""
    q, k, v, cos_sin = qkv_views(t, heads, kv_heads, d, seed=12)
    slots = torch.arange(3, 3 + t).to(DEVICE)
    kc, vc = (torch.zeros(4, BS, kv_heads, d, dtype=DTYPE, device=DEVICE) for _ in range(2))
    got_q, got_k = rope_and_cache(q, k, v, cos_sin, kc, vc, slots, with_k=True)
    torch.testing.assert_close(got_q, apply_rope(q, cos_sin), **TOL)
    torch.testing.assert_close(got_k, apply_rope(k, cos_sin), **TOL)
    assert torch.equal(got_k, kc.view(-1, kv_heads, d)[slots])


@pytest.mark.parametrize("t,heads,kv_heads,d", ROPE_CASES[1:3])
def test_rope_and_cache_into_an_fp8_cache(t, heads, kv_heads, d):
    """fp8 cache: the E4M3 codes of rotated k / k_scale and v / v_scale, saturated at +-448, against
    float64 rotation then torch's own cast (a code may differ by one step where the kernel's single
    rounding of the rotation lands on the other side of a tie); the rotated keys returned stay exact."""
    q, k, v, cos_sin = qkv_views(t, heads, kv_heads, d, seed=21)
    slots = torch.arange(2, 2 + t).to(DEVICE)
    kc, vc = (torch.zeros(4, BS, kv_heads, d, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(2))
    ks, vs = 0.004, 0.002  # some |k| / ks and |v| / vs above 448: saturation is exercised
    got_q, got_k = rope_and_cache(q, k, v, cos_sin, kc, vc, slots, with_k=True, kv_scales=(ks, vs))
    torch.testing.assert_close(got_k, apply_rope(k, cos_sin), **TOL)
    c, s = cos_sin.double()[:, None, : d // 2], cos_sin.double()[:, None, d // 2:]
    k1, k2 = k.double()[..., : d // 2], k.double()[..., d // 2:]
    k_rot = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], -1)
    for cache, x, scale in ((kc, k_rot, ks), (vc, v.double(), vs)):
        want = (x / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).float()
        got = cache.view(-1, kv_heads, d)[slots].float()
        assert (got.abs() <= 448).all() and (want.abs() == 448).any()
        ulp = 2.0 ** (torch.floor(torch.log2(want.abs().clamp(min=2 ** -6))) - 3)  # one E4M3 step
        assert ((got - want).abs() <= ulp * (1 + 1e-6)).all()
        assert ((got - want).abs() > 0).float().mean() < 0.02
    with pytest.raises(ValueError, match="kv_scales"):
        rope_and_cache(q, k, v, cos_sin, kc, vc, slots)
