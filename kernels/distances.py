"""The distance formula of ``maskvl.numerics.distances_from_moments`` as a Triton device function."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    # tl.sqrt is the fast approximate root for fp32 on NVIDIA; sqrt_rn is IEEE (fp32 only).
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def distances_from_moments(A, B, C, ACC: tl.constexpr):
    """Same operations, same order, same degenerate-case conventions as the PyTorch formula."""
    C = tl.where(C < 0, 0.0, C)
    nc = _sqrt(tl.where(A < 0, 0.0, A), ACC)
    msq = (A + 2.0 * B) + C
    nm = _sqrt(tl.where(msq < 0, 0.0, msq), ACC)
    l2 = _sqrt(C, ACC)
    denom = nc + nm
    safe = denom > 0
    diff = tl.where(safe, (2.0 * B + C) / tl.where(safe, denom, 1.0), 0.0)
    prod = nc * nm
    both = prod > 0
    cosd = (C - diff * diff) / tl.where(both, 2.0 * prod, 1.0)
    cosd = tl.where(cosd < 0, 0.0, tl.where(cosd > 2.0, 2.0, cosd))
    # One vector zero -> 1 (orthogonal by convention); both zero -> 0 (identical).
    cosd = tl.where(both, cosd, tl.where(safe, 1.0, 0.0))
    return l2, cosd
