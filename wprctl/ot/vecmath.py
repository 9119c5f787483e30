"""exp and log that vectorize inside numba loops.

Without Intel's SVML, numba lowers ``math.exp`` and ``math.log`` to one libm call per value: a
loop holding one does not vectorize, and each call goes through glibc's errno wrapper. These are
written as plain arithmetic on the float bits (through the bitcast intrinsics below), so LLVM
vectorizes a loop that inlines them. Measured on an AMD Zen 1 (AVX2, loops of 300 values,
``compiled.VEC_OPTS``): float64 exp 4.5 ns a value against libm's 7.8, log 5.6 against 7.0; the
float32 exp of ``topk_cpu`` 1.5 ns against 5.1 for the same loop in float64.

``exp64`` is within 3 ulp of numpy's exp, ``log64`` within 2 ulp of its log
(tests/test_ot_identities.py). Inline them only into functions compiled without ``reassoc``
(``compiled.OPTS`` or ``VEC_OPTS``, not ``SUM_OPTS``): their range reductions rely on the exact
order of their additions (x + 1.5 * 2^52 - 1.5 * 2^52 would fold to x). Keep sums in a separate
function.

numba's cache (``compiled.OPTS``: ``cache=True``) is keyed by the source file of the cached
function only: after editing this file, delete the ``topk_cpu*`` and ``wellposed_cpu*`` cache
files in ``wprctl/ot/__pycache__`` (an installed upgrade replaces every file, so it recompiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


def _bitcast(to: Any, to_ir: ir.Type, accepts: Callable[[Any], bool]) -> Any:
    """An intrinsic that reads its argument's bits as a ``to``; a wider integer argument is cut
    to its low ``to.bitwidth`` bits first (numba widens int32 arithmetic to int64)."""

    @intrinsic
    def bitcast(typingctx: Any, x: Any) -> Any:
        if not accepts(x):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            value = args[0]
            if isinstance(x, types.Integer) and x.bitwidth > to.bitwidth:
                value = builder.trunc(value, ir.IntType(to.bitwidth))
            return builder.bitcast(value, to_ir)

        return to(x), codegen

    return bitcast


# the float32 whose bit pattern is the low 32 bits of an integer
f32_from_bits = _bitcast(
    types.float32, ir.FloatType(), lambda x: isinstance(x, types.Integer) and x.bitwidth >= 32
)
# the float64 whose bit pattern is an int64, and back
f64_from_bits = _bitcast(types.float64, ir.DoubleType(), lambda x: x == types.int64)
f64_bits = _bitcast(types.int64, ir.IntType(64), lambda x: x == types.float64)


# Cody-Waite split of ln 2 (fdlibm): n * _LN2_HI is exact for |n| < 2^11
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
# x + 1.5 * 2^52 rounds x to an integer held in the low mantissa bits: AVX2 has no packed
# float64 <-> int64 conversion, so np.int64(x) in a loop would not vectorize
_ROUND = 6755399441055744.0
_EXP_LO, _EXP_HI = -708.0, 709.0


@njit(inline="always", error_model="numpy")
def exp64(x: float) -> float:
    """exp(x) in float64: 0 below -708 (no subnormal results), inf above 709, NaN for NaN.

    exp(r) 2^n with x = n ln 2 + r, |r| <= ln 2 / 2, exp(r) by its degree-12 Taylor polynomial
    (truncation error < 2e-16 relative), evaluated by Estrin's scheme (a short dependency chain;
    Horner's is latency-bound)."""
    xc = min(max(x, _EXP_LO), _EXP_HI)
    t = xc * _INV_LN2 + _ROUND
    n = t - _ROUND
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    r2 = r * r
    r4 = r2 * r2
    b0 = (1.0 + r) + r2 * (1 / 2 + r * (1 / 6))
    b1 = (1 / 24 + r * (1 / 120)) + r2 * (1 / 720 + r * (1 / 5040))
    b2 = (1 / 40320 + r * (1 / 362880)) + r2 * (1 / 3628800 + r * (1 / 39916800))
    p = (b0 + r4 * b1) + (r4 * r4) * (b2 + r4 * (1 / 479001600))
    y = p * f64_from_bits((f64_bits(t) + 1023) << 52)  # 2^n: n in the low bits of t
    y = 0.0 if x < _EXP_LO else y
    y = math.inf if x > _EXP_HI else y
    return y if x == x else x


# fdlibm's log: Remez coefficients of (log(1 + f) - 2s + s R) in s = f / (2 + f)
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_SQRT2 = 1.4142135623730951
_EXP_FIELD = 0x4330000000000000  # the bits of 2^52: an integer in the low bits reads as 2^52 + it


@njit(inline="always", error_model="numpy")
def log64(x: float) -> float:
    """log(x) in float64 for a positive normal x (>= 2.2250738585072014e-308), +inf or NaN (the
    callers clamp at the smallest normal; zero, negative and subnormal inputs are not handled).

    x = 2^k m with m in [sqrt(2)/2, sqrt(2)), then fdlibm's log(1 + f) for f = m - 1."""
    b = f64_bits(x)
    exponent = np.int64(np.uint64(b) >> np.uint64(52))  # logical shift: AVX2 has no 64-bit sra
    m = f64_from_bits((b & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    k = f64_from_bits(exponent | _EXP_FIELD) - (2.0**52 + 1023.0)
    k = k + 1.0 if big else k
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    R = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    hfsq = 0.5 * f * f
    y = k * _LN2_HI - ((hfsq - (s * (hfsq + R) + k * _LN2_LO)) - f)
    return y if x < math.inf else x
